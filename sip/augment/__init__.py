"""The augmentation side: caption → prompt → generate → filter → write.

:mod:`~sip.augment.caption`, :mod:`~sip.augment.prompts`, :mod:`~sip.augment.generate`,
:mod:`~sip.augment.filter`, and :mod:`~sip.augment.run` (``sip augment`` / ``sip synth``). This side never
imports :mod:`sip.train` or :mod:`sip.distill`.
"""
