"""Federated, differentially private LoRA fine-tuning of the served model on Flower.

Entry points: `bastion finetune federated` (cli.add_finetune_parser), `runner.run(cfg, out)`
from Python, and `server.server_app` / `client.client_app` for `flwr run` or a SuperLink.
Heavy imports (torch, flwr, opacus, peft) happen inside the submodules, not here.
"""
