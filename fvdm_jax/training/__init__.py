"""Training: the jitted step, the loop with exact resume and preemption, fine-tuning from
pretrained weights, FLOPs and MFU. It imports no sampling, evaluation or job."""
