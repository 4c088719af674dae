"""Names every backbone shares (model.HaloNet, byob.ByobNet): what fine-tuning, multi-scale
features and the training loop look up by name."""

CLASSIFIER = 'head'  # Name of the final Dense layer: re-initialised or trained alone (fine-tuning).
FEATURES = 'features'  # The collection each stage's output is sown into, when it is mutable.
PRE_LOGITS = 'pre_logits'  # The collection the pooled features before the classifier are sown into.
