"""Data for the plugin's train specs: `corpus` (the embedded corpus), `datasets` (sources,
held-out split, packing, `validate_data_config`), `tokenizer` (BPE training, `build_tokenizer`)
and `config` (the `[training]`/`[validation]` keys). The torchtitan builders (training loader,
validator) are in `titan_geonorm.titan.data`.
"""
