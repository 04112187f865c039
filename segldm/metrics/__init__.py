"""Evaluation metrics: FID/KID with torch-fidelity's Inception (:mod:`.fid`), set-level mIoU (:mod:`.miou`),
and the segmentation networks that label generated images for it (:mod:`.segmenters`)."""
