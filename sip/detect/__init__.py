"""Object detection: scene datasets in COCO format (:mod:`sip.detect.scenes`, :mod:`sip.detect.coco`),
detectors (:mod:`sip.detect.models`), their training through sip's loop (:mod:`sip.detect.train`) and
detection KD losses (:mod:`sip.detect.kd_losses`)."""
