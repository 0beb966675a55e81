"""Quality evaluation of LightTransfer conversions through vLLM (see bench/eval_quality.py)."""
