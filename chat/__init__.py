"""The chat with the fine-tuned model's endpoint: the call both chats share (endpoint_client.py), the Agent
Framework chat and its server, and one question through either chat (ask_flow.py, ask_agent.py)."""
