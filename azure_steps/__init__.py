"""What the two Azure steps, setup_ml.py and deploy_model.py, share: the workspace's client, the
pre-flight, the prices, what bills now (`python -m azure_steps.billing`) and the rehearsal."""
