"""
The trainable parts of MediCLIP (Zhang et al., "MediCLIP: Adapting CLIP for Few-shot Medical Image Anomaly
Detection", MICCAI 2024): per-layer adapters, CoOp-style learnable prompts, the anomaly map and its losses, and
the frozen CLIP text tower the prompts go through (TextTower, CoOp's TextEncoder).

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
    text = model.text_features(mediclip.TextTower(clip))    # (E, 2)
    probs = model(tokens, text, image_size=224)              # (B, 2, S, S)
"""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastclip import cast_linears, fold_quickgelu

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

    def similarity(self, x, text):
        """(B, D, H, W), text (E, C) -> (B, H, W, C) = forward(x) @ text, with the L2 division after the product:
        it then divides C numbers per token, not E (the same maths; F.normalize's backward over the E dimensions
        was the adapters' costliest part after their matrix products)."""
        f = self.proj(self.ln(x.permute(0, 2, 3, 1)))                            # (B, H, W, E)
        return (f @ text) / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)       # (B, H, W, C), as F.normalize


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


class TextTower(nn.Module):
    """CLIP's frozen text transformer fed with token *embeddings*, so that prompt contexts can be learned.

    With CLIP's causal mask a token sees only itself and the tokens before it, so tokens after a prompt's
    end-of-text (EOT) cannot change its features: they are never computed (exact). The prompts' tokens run packed,
    one row each, through the linear layers (MediCLIP's 21 prompts: 276 rows where a padded batch has 336); only
    the attention sees them as a padded (prompts, length) grid. Only the EOT rows leave the last block, so it
    computes the others' keys and values alone (last_block_at_eot).
    """

    def __init__(self, clip, linear_dtype=None):
        """linear_dtype (e.g. torch.bfloat16): a copy of the blocks whose linear weights are stored in that dtype,
        for a tower that runs only under autocast to it (train.py's bf16 steps). Autocast recasts a frozen weight
        at every use (it keeps the casts of trainable ones only); stored cast, the bits are the same without the
        casts (ViT-L-14, bf16, forward + backward on 2 CPU cores: 168 -> 143 ms), and QuickGELU is folded into
        the copy's MLP weights (fastclip.fold_quickgelu: the same function to rounding; 154 -> 137 ms). Outside
        that autocast such a tower fails (mixed dtypes). CLIP's plain blocks only; other towers ignore it."""
        super().__init__()
        if not hasattr(clip, "token_embedding"):
            raise ValueError("only CLIP models with open_clip's built-in text tower are supported")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.batch_first = getattr(clip.transformer, "batch_first", False)
        # packing needs the causal mask and open_clip's plain residual blocks (CLIP's); other towers run padded
        self.packed = clip.attn_mask is not None and all(is_plain_block(b) for b in clip.transformer.resblocks)
        if linear_dtype is not None and self.packed:
            self.transformer = copy.deepcopy(clip.transformer)
            for block in self.transformer.resblocks:   # attention in/out and MLP cast; the LayerNorms stay
                cast_linears(fold_quickgelu(block), linear_dtype)

    def forward(self, x, eot):
        """x (N, L, W) prompt embeddings, eot (N,) index of each EOT token -> (N, E) text features."""
        L = int(eot.max()) + 1
        x = x[:, :L] + self.positional_embedding[:L].to(x.dtype)      # (N, L, W)
        # CPU: plain softmax(QK^T)V; the fused kernel's backward took 16x its forward on these short prompts
        with sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext():
            x = self.run_packed(x, eot) if self.packed else self.run_padded(x, eot)   # (N, W) at each EOT
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def run_padded(self, x, eot):
        mask = self.attn_mask[:x.shape[1], :x.shape[1]] if self.attn_mask is not None else None
        x = x if self.batch_first else x.transpose(0, 1)  # (L, N, W) for open_clip 2.x
        x = self.transformer(x, attn_mask=mask)
        x = x if self.batch_first else x.transpose(0, 1)  # (N, L, W)
        return self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]

    def run_packed(self, x, eot):
        N, L, W = x.shape
        rows = (torch.arange(L, device=x.device) <= eot[:, None]).flatten().nonzero().squeeze(1)  # (T,) SOT..EOT
        h = x.reshape(N * L, W)[rows]                                  # (T, W)
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            h = packed_block(block, h, rows, N, L)
        return self.ln_final(last_block_at_eot(last, h, rows, eot, N, L))  # (N, W)


def is_plain_block(block):
    """open_clip's ResidualAttentionBlock as CLIP has it: nn.MultiheadAttention, no extra norms or kv inputs."""
    return (isinstance(getattr(block, "attn", None), nn.MultiheadAttention) and block.attn._qkv_same_embed_dim
            and all(hasattr(block, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
            and not any(hasattr(block, a) for a in ("ln_1_kv", "ln_attn", "ln_inner")))


def packed_block(block, h, rows, N, L):
    """One residual attention block (open_clip's forward) on packed rows h (T, W); rows (T,) is the cell of each
    row in the padded (N, L) grid, where the cells after an EOT stay zero and the causal mask hides them."""
    a, W = block.attn, h.shape[1]
    qkv = F.linear(block.ln_1(h), a.in_proj_weight, a.in_proj_bias)                    # (T, 3W)
    qkv = qkv.new_zeros(N * L, 3 * W).index_copy(0, rows, qkv)                         # (N L, 3W)
    q, k, v = qkv.view(N, L, 3, a.num_heads, W // a.num_heads).permute(2, 0, 3, 1, 4)   # each (N, heads, L, d)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)                        # (N, heads, L, d)
    o = o.transpose(1, 2).reshape(N * L, W)[rows]                                      # (T, W)
    h = h + block.ls_1(a.out_proj(o))
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def last_block_at_eot(block, h, rows, eot, N, L):
    """The last block of packed_block, where only each prompt's EOT row is read: keys and values of every row, the
    query, attention output and MLP of the N EOT rows alone (the same maths; about 3/4 of the last block's work)."""
    a, W = block.attn, h.shape[1]
    wq, wkv = a.in_proj_weight.split([W, 2 * W])
    bq, bkv = a.in_proj_bias.split([W, 2 * W]) if a.in_proj_bias is not None else (None, None)
    at = (eot + 1).cumsum(0) - 1                                                        # (N,) EOT rows of h
    y = block.ln_1(h)                                                                   # (T, W)
    kv = F.linear(y, wkv, bkv)                                                          # (T, 2W)
    kv = kv.new_zeros(N * L, 2 * W).index_copy(0, rows, kv)                             # (N L, 2W)
    k, v = kv.view(N, L, 2, a.num_heads, W // a.num_heads).permute(2, 0, 3, 1, 4)       # each (N, heads, L, d)
    q = F.linear(y[at], wq, bq)                                                         # (N, W)
    q = q.view(N, a.num_heads, 1, W // a.num_heads)                                     # (N, heads, 1, d)
    seen = (torch.arange(L, device=h.device) <= eot[:, None]).view(N, 1, 1, L)          # the causal mask's EOT row
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=seen).reshape(N, W)           # (N, W)
    x = h[at] + block.ls_1(a.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))                                     # (N, W)


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
        logits = torch.stack([a.similarity(t, text) for a, t in zip(self.adapters, tokens)]).mean(0)  # (B, H, W, 2)
        # a two-class softmax is the sigmoid of the logits' difference, and bilinear upsampling is linear: upsample
        # the difference alone (half the work of upsampling both logits, the same maths)
        d = (logits[..., 1] - logits[..., 0]).unsqueeze(1)                 # (B, 1, H, W)
        p = F.interpolate(d, size=(image_size, image_size), mode="bilinear", align_corners=True).sigmoid()
        return torch.cat([1 - p, p], dim=1)                                # (B, 2, S, S)


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
