"""Knowledge distillation: KD losses (:mod:`~sip.distill.losses`), teachers (:mod:`~sip.distill.teachers`),
replayable views (:mod:`~sip.distill.views`), precomputed teacher logits (:mod:`~sip.distill.logits`), and the
``sip distill`` / ``sip logits`` runs (:mod:`~sip.distill.run`). Import from the submodules; nothing is
registered by importing this package.
"""
