"""The chat with the fine-tuned model's endpoint: the call both chats share, and the Agent Framework chat."""
