"""The torch-free, HTTP-free core that serving and training share; it imports nothing else of ours.

DICOM in: :mod:`~service.core.reading` (hostile-input reading, one file at a time),
:mod:`~service.core.series` (grouping, frames), :mod:`~service.core.volume` (the one decision
"is this one 3D volume", and the decoding); :mod:`~service.core.flair` (FLAIR rules),
:mod:`~service.core.limits` (what a series may cost), :mod:`~service.core.preprocess`. The ONNX
contract is :mod:`~service.core.contract`; every reason and problem code is
:mod:`~service.core.codes`; settings are :mod:`~service.core.config`.
"""
