//! Pruning, knowledge distillation and int8 weight quantisation (filled by the compression issue).
