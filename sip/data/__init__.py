"""Data: image sources (folders, Hugging Face datasets, Fashion-MNIST), the on-disk bank sip writes and
reads (:mod:`~sip.data.bank`), and real + synthetic mixing for training (:mod:`~sip.data.mixing`)."""
