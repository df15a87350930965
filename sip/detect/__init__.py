"""Object detection: scene datasets in COCO format (:mod:`sip.detect.scenes`, :mod:`sip.detect.coco`),
detectors (:mod:`sip.detect.models`; a ViT's simple feature pyramid: :mod:`sip.detect.vit_backbone`), their
training through sip's loop (:mod:`sip.detect.train`) and detection KD losses (:mod:`sip.detect.kd_losses`)."""
