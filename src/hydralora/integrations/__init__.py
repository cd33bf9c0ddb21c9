"""Bridges to the tools practitioners already use, each importing its tool on demand:
`hydralora.integrations.trl` (TRL's SFTTrainer), `hydralora.integrations.lm_eval`
(lm-evaluation-harness); the Hugging Face Hub is `hydralora.hub`."""
