"""How far to trust the answers on this model: ``diagnostics`` (candidate recall, solver agreement),
``checks`` (leave-one-out retraining, solver agreement against an exact reference), ``self_influence`` (mislabel
detection) and ``lds`` (the linear datamodeling score). Import the modules themselves; the public names are also on
:mod:`lightning_fastif`."""
