"""The names the engine and the ``tap-fast`` command choose from, in one module that imports nothing, so that
``tap-fast --help`` and argument errors answer without importing torch. TAP's norms are ``kernels.NORMS``
(kernels/ imports nothing from tap_fast)."""

DATASETS = ("digits", "mnist", "pneumoniamnist", "pneu", "knee", "folder")  # folder: the user's own images
CONTAMINATIONS = ("decoy", "tag", "stripe")  # section 5 / Appendix F: contamination.KINDS
CLASS_WEIGHTS = ("none", "balanced")  # cross-entropy (and RBR) weights: none, or inverse class frequency
FEEDS = ("auto", "memory", "dali", "torchvision")  # how training batches are made (see tap_fast.preparation)
ARCH_NAMES = ("cnn2", "vgg16", "resnet18", "densenet121", "efficientnet_b0", "mobilenet_v2")  # models.ARCHS
# Appendix M's knowledge-distillation baselines, each matching the teacher of teacher annotations: AT
# (attention transfer, Zagoruyko and Komodakis 2017: the tapped layers' attention maps), JT (Jacobian transfer,
# Srinivas and Fleuret 2018: input gradients) and KD (Hinton et al. 2015: logits at a temperature)
DISTILLATION_METHODS = ("at", "jt", "kd")
# eq. 3's XS penalty: none (No XS / Base), TAP (eq. 8), RRR / RBR (eq. 4); or a distillation term
METHODS = ("none", "tap", "rrr", "rbr", *DISTILLATION_METHODS)
TAP_BACKENDS = ("auto", "torch", "triton")  # tap_penalty's: the PyTorch reference or the fused kernels
# A training step's: also the fused kernels' identity form inside the forward (TappedModel.forward_tap)
STEP_BACKENDS = (*TAP_BACKENDS, "identity")
ANNOTATIONS = ("ground-truth", "teacher", "random")  # masks: ground truth, a teacher's (eq. 14) or random
AMP_MODES = ("none", "bf16")  # autocast of the training step: none (fp32) or bf16
TAUS = (0.01, 0.05, 0.1)  # Figure 8's thresholds of eq. 14
# eq. 14's tau: the fraction of lowest-saliency pixels per image (released code), or E < tau as printed
TAU_RULES = ("quantile", "threshold")
# SC(X*, permute(y)): a random signal per image (paper, released code; binary tasks swap), or a derangement
PERMUTES = ("random", "derangement")
TAG_MASKS = ("box", "ink")  # a text tag's ground-truth mask: its whole box (released code), or its ink only
# Text tags on images under 77 px, where the 22 px tag would scale under the font's smallest (8 px) render: that
# render (legible, white), or the tag burnt into a 224 px image that is then shrunk by area averaging (grey)
TAG_STYLES = ("font", "shrunk")
SWEEP_GRIDS = ("decade", "half")  # the sweep's lambdas: 1 per decade (section 5.3), or 1 and 3 per decade
SWEEP_SELECTIONS = ("loss", "metric")  # the sweep selects on the permuted validation loss or task metric
OVERLAP_IMAGES = 256  # train's Appendix D overlap: at most this many contaminated test images (stratified)
