"""Where an attention module sits: its heads, its prefix tokens, and the grid its tokens lie on in the image.

Its own module so that the timm tap (``taps/attention.py``) and the Hugging Face / torchvision captures
(``taps/attention_capture.py``) share it without importing each other.
"""

from dataclasses import dataclass

from lightning_cka.functional.attention import patch_distances

KINDS = ("timm", "hf", "hf_swin", "torchvision_mha", "torchvision_swin")
# Whose attention the monitor reads, for the reason an analysis gives when a model has none.
READABLE = "those of timm ViTs, torchvision ViT / Swin and Hugging Face ViT / DeiT / Dinov2 / Swin"


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and where its patch tokens sit in the image.

    Attributes:
        name: module name.
        num_heads: heads of the module.
        num_prefix_tokens: leading non-patch tokens (CLS, distillation, registers).
        grid: patch grid ``(gh, gw)`` at the model's construction size; for window attention (Swin) the window.
        stride: distance in input pixels between neighbouring tokens ``(sh, sw)``: the patch size of a plain ViT, the
            backbone stride times the patch size of a hybrid ViT (``patch_embed.feat_ratio()``), the patch size times
            the stage's downsampling of a Swin stage.
        embed: name of the patch embedding, whose output (timm) or input (Hugging Face) tells the actual grid of
            dynamic-size ViTs; ``""`` for window attention.
        kind: whose attention it is, which says how its probabilities are read: ``"timm"`` (``q_norm`` / ``k_norm``
            outputs), ``"hf"`` (the ``q_proj`` / ``k_proj`` outputs of Hugging Face ViT, DeiT, Dinov2; ``query`` /
            ``key`` in transformers 4), ``"hf_swin"`` (the same in Swin's windows, with its relative position bias and
            shift mask), ``"torchvision_mha"`` (``nn.MultiheadAttention``'s input and ``in_proj_weight``),
            ``"torchvision_swin"`` (``ShiftedWindowAttention``'s input and ``qkv`` weights).
        head_dim: channels per head (0: read from the module).
        proj: the module whose input is the heads' outputs side by side, head-major ``(B, T, H·d)``; ``""`` when no
            module receives them (torchvision computes its output projection functionally).
        block: the block that calls the module (Hugging Face Swin: it receives the stage's grid).
    """

    name: str
    num_heads: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    stride: tuple[float, float]
    embed: str
    kind: str = "timm"
    head_dim: int = 0
    proj: str = ""
    block: str = ""

    @property
    def uniform_distance(self) -> float:
        """Mean distance of a head that attends to every patch alike, in pixels: the scale of local and global."""
        return float(patch_distances(self.grid, self.stride).mean())

    @property
    def windowed(self) -> bool:
        """Its tokens are windows of the grid (Swin): distances are measured inside each window."""
        return self.kind in ("hf_swin", "torchvision_swin")
