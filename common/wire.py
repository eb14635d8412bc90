"""The names that messages carry between the ServerApp and the ClientApps, written once for both sides."""

# Records of a message's RecordDict
ARRAYS = "arrays"  # the weights: the global ones down, a client's trained ones up
CONFIG = "config"  # the run's configuration and the round
METRICS = "metrics"  # what a client reports (one MetricRecord: Flower's client-side DP mods want exactly one)
INFO = "info"  # which client a node holds: domain, client name, classes, the CLIP's fingerprint

# Keys of the config record
RUN_CONFIG = "run-config"  # the run's resolved configuration as YAML: a client never composes Hydra
SERVER_ROUND = "server-round"
APP_CODE = (
    "app-code"  # the hash of the code a client runs (common/fingerprint.app_code_fingerprint), as the server has it
)
RUN_KEY = (
    "run-key"  # the app's run, across resumes: names what a client keeps between rounds (client_app/kept_state.py)
)
EVALUATE_ROUND = "evaluate-round"  # a train message also carries the evaluation of the weights it brings, of this round
ZERO_SHOT = "zero-shot"  # round 0: evaluate CLIP with no trained weights
ADAPTER_KEYS = "adapter-keys"  # SecAgg+: the tensor names, in the order of the FitIns parameters
SECAGG_WEIGHTING = "secagg-weighting"  # SecAgg+: strategy.weighting, for the weight a client gives its masked update

# Metric names
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
IMAGES_ENCODED = "images-encoded"  # images that went through the CLIP image encoder for this reply
FEATURE_DIM = "feature-dim"  # discovery: the CLIP's feature size
NUM_TRAIN = "num-train"  # discovery: the client's train split
QUERY_METRICS = (
    FEATURE_DIM,
    "num-images",
    "num-skipped",
    NUM_TRAIN,
    "num-val",
    "num-test",
)  # what a node reports at discovery
# A train reply carries the evaluation of the weights its message brought in its one MetricRecord, under this prefix.
EVALUATION_PREFIX = "evaluation/"
