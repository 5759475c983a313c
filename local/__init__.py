"""Local stand-ins for what the tutorial fetches from the Hugging Face Hub and Azure.

Nothing in here is part of the tutorial's pipeline itself: it is what lets the pipeline and its
tests run on a machine with no Hub, no Azure and no GPU (a tiny Phi-3 model, ultrachat-shaped
sample chats, and the orchestration of the local run).
"""
