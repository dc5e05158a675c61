"""
The trainable parts of MediCLIP (Zhang et al., "MediCLIP: Adapting CLIP for Few-shot Medical Image Anomaly
Detection", MICCAI 2024): per-layer adapters, CoOp-style learnable prompts, the anomaly map and its losses.

    anomaly map  M = softmax_c( mean_l  A_l(tokens_l) . t_c ),  c in {normal, abnormal}, upsampled to the image
    image score  s = max M[abnormal]           (or the mean of its top-k pixels)
    loss         focal(M, mask; gamma=2) + dice(M[abnormal], mask)

Prompts (CoOp, Zhou et al. 2022, with class-specific contexts): "[X]*8 {phrase}." for MediCLIP's 10 normal and
11 abnormal phrases; the 8 context embeddings of every phrase are learned. The text feature of a class is the
mean of its prompts' features, L2-normalised (as MediCLIP).

Zero-shot start: each context is initialised with the token embeddings of a plain template, and each
adapter with CLIP's own final LayerNorm + projection, so an untrained model gives CLIP's zero-shot maps.

    import encode, mediclip
    clip = encode.load_clip("ViT-B-16", random_init=True)
    model = mediclip.build_mediclip(clip, n_layers=3)
    text = model.text_features(encode.TextTower(clip))      # (E, 2)
    probs = model(tokens, text, image_size=224)              # (B, 2, S, S)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# MediCLIP's phrases (its config/*.yaml)
NORMAL_PHRASES = ["normal", "healthy", "negative", "unremarkable", "clear", "asymptomatic",
                  "normal findings", "no findings", "in good health", "no evidence of disease"]
ABNORMAL_PHRASES = ["abnormal", "positive", "symptomatic", "disease", "lesion", "pathological", "impaired",
                    "evidence of disease", "abnormal finding", "pathological condition",
                    "pathological abnormality"]
CTX_INIT = "a photo of a medical image that is"  # 8 tokens: the zero-shot template the contexts start from


class Adapter(nn.Module):
    """Token dim D -> joint embedding dim E, L2-normalised. Initialised from CLIP's ln_post + proj."""

    def __init__(self, token_dim, embed_dim):
        super().__init__()
        self.ln = nn.LayerNorm(token_dim)
        self.proj = nn.Linear(token_dim, embed_dim, bias=False)

    def forward(self, x):                     # (B, D, H, W)
        x = x.permute(0, 2, 3, 1)            # (B, H, W, D)
        return F.normalize(self.proj(self.ln(x)), dim=-1)  # (B, H, W, E)


class PromptLearner(nn.Module):
    """Learnable contexts for every phrase of both classes; prefix/suffix embeddings are fixed buffers."""

    def __init__(self, n_normal, n_abnormal, n_ctx, width):
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx_normal = nn.Parameter(torch.randn(n_normal, n_ctx, width) * 0.02)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_abnormal, n_ctx, width) * 0.02)

    def set_embeddings(self, embeddings, eot):
        """embeddings (N, 77, W) of '{ctx_init} {phrase}.' for all phrases (normal first), eot (N,)."""
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)                  # SOT
        self.register_buffer("suffix", embeddings[:, 1 + self.n_ctx:].clone(), persistent=False)     # phrase . EOT
        self.register_buffer("eot", eot.clone(), persistent=False)

    def forward(self):
        ctx = torch.cat([self.ctx_normal, self.ctx_abnormal])         # (N, n_ctx, W)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1), self.eot  # (N, 77, W), (N,)


class MediCLIP(nn.Module):
    """Adapters (one per CLIP layer) + prompts -> two-class anomaly map."""

    def __init__(self, token_dim, embed_dim, n_layers, text_width, n_ctx=8):
        super().__init__()
        self.adapters = nn.ModuleList(Adapter(token_dim, embed_dim) for _ in range(n_layers))
        self.prompts = PromptLearner(len(NORMAL_PHRASES), len(ABNORMAL_PHRASES), n_ctx, text_width)

    def text_features(self, text_tower):
        """(E, 2): the normal and abnormal text features, each the normalised mean over its prompts."""
        x, eot = self.prompts()
        feats = text_tower(x, eot)                                      # (N, E)
        n = len(NORMAL_PHRASES)
        t = torch.stack([feats[:n].mean(0), feats[n:].mean(0)], dim=1)  # (E, 2)
        return t / t.norm(dim=0, keepdim=True)

    def forward(self, tokens, text, image_size):
        """tokens: list over layers of (B, D, H, W); text (E, 2) -> probabilities (B, 2, S, S)."""
        logits = torch.stack([self.adapters[i](t) @ text for i, t in enumerate(tokens)]).mean(0)  # (B, H, W, 2)
        logits = F.interpolate(logits.permute(0, 3, 1, 2), size=(image_size, image_size),
                               mode="bilinear", align_corners=True)      # (B, 2, S, S)
        return logits.softmax(dim=1)


def tokenize_prompts(ctx_init=CTX_INIT):
    """Token ids (N, 77) of '{ctx_init} {phrase}.' for every phrase, and the index of each EOT token."""
    import open_clip
    ids = open_clip.tokenize([f"{ctx_init} {p}." for p in NORMAL_PHRASES + ABNORMAL_PHRASES])
    return ids, ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary


def build_mediclip(clip, n_layers, ctx_init=CTX_INIT, n_ctx=8):
    """A MediCLIP initialised to CLIP's zero-shot behaviour (see the module docstring)."""
    import open_clip
    n_template = len(open_clip.tokenize([ctx_init])[0].nonzero()) - 2  # minus SOT and EOT
    if n_template != n_ctx:
        raise ValueError(f"the context template {ctx_init!r} has {n_template} tokens, expected {n_ctx}")
    v = clip.visual
    embed_dim = v.proj.shape[1] if v.proj is not None else v.transformer.width
    model = MediCLIP(v.transformer.width, embed_dim, n_layers, clip.token_embedding.weight.shape[1], n_ctx)
    ids, eot = tokenize_prompts(ctx_init)
    with torch.no_grad():
        emb = clip.token_embedding(ids)                                 # (N, 77, W)
        model.prompts.ctx_normal.copy_(emb[:len(NORMAL_PHRASES), 1:1 + n_ctx])
        model.prompts.ctx_abnormal.copy_(emb[len(NORMAL_PHRASES):, 1:1 + n_ctx])
        for a in model.adapters:
            a.ln.load_state_dict(v.ln_post.state_dict())
            if v.proj is not None:
                a.proj.weight.copy_(v.proj.T)
            else:
                a.proj.weight.copy_(torch.eye(embed_dim))
    model.prompts.set_embeddings(emb, eot)
    return model


def image_scores(probs, topk=0):
    """(B, 2, S, S) -> (B,) image scores: max of the abnormal map, or the mean of its top-k pixels."""
    return scores_from_top(probs[:, 1].flatten(1).topk(max(topk, 1), dim=1).values, topk)


def scores_from_top(top, topk=0):
    """(B, >= k) abnormal-map values in descending order -> (B,) image scores, by the same rule."""
    return top[:, 0] if topk <= 0 else top[:, :topk].mean(dim=1)


def focal_loss(probs, mask, gamma=2.0, smooth=1e-5):
    """Focal loss (Lin et al. 2017) on two-class probabilities (B, 2, S, S) and a binary mask (B, 1, S, S)."""
    probs = probs.float()                                                    # losses in fp32, also under autocast
    target = torch.cat([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)  # smoothed one-hot, as MediCLIP
    pt = (target * probs).sum(dim=1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(probs, mask, smooth=1.0):
    """1 - Dice between the abnormal probability map and the mask, averaged over the batch."""
    p, m = probs[:, 1].flatten(1).float(), mask.flatten(1)
    return 1 - ((2 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)).mean()
