"""Teaching the generator the user's classes: textual inversion, LoRA (peft) and UNet fine-tuning on the user's
few shots (``sip adapt``), and loading what they write (:mod:`sip.adapt.use`, the augmentation side's only door
here). Outputs are files diffusers' own loaders read (``load_textual_inversion``, ``load_lora_weights``,
``from_pretrained``)."""
