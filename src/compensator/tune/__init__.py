"""Fine-tuning a saved checkpoint by distillation from its base model (``compensator
finetune``): what trains (``parts``), the teacher's cached targets and the loss
(``teacher``), the training text (``windows``), the loop and its resumable state."""
