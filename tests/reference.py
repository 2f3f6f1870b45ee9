"""An independent LookWhere forward, written from ../shared/LOOKWHERE.md step by step.

It shares no code with timm_lookwhere: plain timm ViTs are loaded from the authors' nested
checkpoint, every high-res patch is embedded and then gathered (the authors' order of work), and the
dense fill ranks neighbours with a stable sort over float distances (the tie rule LOOKWHERE.md gives).
"""
import math

import torch
import torch.nn.functional as F

import timm


def build_reference(checkpoint, img_size, *, embed_dim, depth, num_heads, reg_tokens, selector_img_size,
                    selector_depth, map_grid=37, patch_size=14, vit_kwargs=None):
    vit_kwargs = dict(
        patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads, init_values=1e-5, reg_tokens=reg_tokens,
        no_embed_class=True, num_classes=0, **(vit_kwargs or {}))
    selector = timm.create_model('vit_base_patch14_reg4_dinov2', depth=selector_depth, img_size=selector_img_size,
                                 **vit_kwargs)
    selector.load_state_dict(checkpoint['selector']['backbone'])
    extractor = timm.create_model('vit_base_patch14_reg4_dinov2', depth=depth, img_size=img_size, **vit_kwargs)
    ext_sd = dict(checkpoint['extractor'])
    rows, cols = img_size[0] // patch_size, img_size[1] // patch_size
    pos = ext_sd['pos_embed']  # (1, g*g, D) at the pre-training grid
    g = int(math.isqrt(pos.shape[1]))
    pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(rows, cols), mode='bicubic', align_corners=False)
    ext_sd['pos_embed'] = pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    extractor.load_state_dict(ext_sd)
    head = checkpoint['selector']['head']
    sel_grid = selector_img_size // patch_size
    return dict(selector=selector.eval(), extractor=extractor.eval(), head=head, grid=(rows, cols),
                sel_size=selector_img_size, sel_grid=sel_grid, mult=math.ceil(map_grid / sel_grid))


def reference_selector(ref, x):
    low = F.interpolate(x, size=(ref['sel_size'], ref['sel_size']), mode='bilinear', align_corners=False)
    vit = ref['selector']
    t = vit.patch_embed(low) + vit.pos_embed  # (B, n, D)
    prefix = [vit.cls_token.expand(len(x), -1, -1)]
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(len(x), -1, -1))
    num_prefix = sum(p.shape[1] for p in prefix)
    t = vit.norm(vit.blocks(torch.cat(prefix + [t], dim=1)))
    h = ref['head']
    patches = t[:, num_prefix:]
    scores = F.linear(F.gelu(F.linear(patches, h['w1.weight'], h['w1.bias'])), h['w2.weight'], h['w2.bias'])
    B, n, m = len(x), ref['sel_grid'], ref['mult']
    # (B, n*n, m*m) -> (B, 1, n*m, n*m): each low-res patch owns an m x m block of the map
    scores = scores.reshape(B, n, n, m, m).permute(0, 1, 3, 2, 4).reshape(B, 1, n * m, n * m)
    scores = F.interpolate(scores, size=ref['grid'], mode='bilinear', align_corners=False)
    return scores.flatten(1), t[:, :num_prefix]


def reference_fill(values, indices, grid, K=5):
    rows, cols = grid
    cells = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij'), -1).reshape(-1, 2)
    chosen = torch.stack([indices // cols, indices % cols], -1)  # (B, k, 2)
    dist = torch.sqrt(((cells[None, :, None, :] - chosen[:, None, :, :]) ** 2).sum(-1).float())  # (B, N, k)
    order = torch.sort(dist, dim=-1, stable=True).indices[..., :K]  # ties: earlier in the top-k wins
    near = dist.gather(-1, order)
    w = 1.0 / (near + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    gathered = torch.stack([values[b][order[b]] for b in range(len(values))])  # (B, N, K, C)
    return (gathered * w[..., None]).sum(2)  # (B, N, C)


@torch.no_grad()
def reference_forward(ref, x, k):
    scores, prefix = reference_selector(ref, x)
    indices = torch.topk(scores, k=k, sorted=True).indices
    ext = ref['extractor']
    t = ext.patch_embed(x) + ext.pos_embed  # every patch, then gather: the authors' order
    t = t[torch.arange(len(x))[:, None], indices]
    t = ext.norm(ext.blocks(torch.cat([prefix, t], dim=1)))
    num_prefix = prefix.shape[1]
    dense = reference_fill(t[:, num_prefix:], indices, ref['grid'])
    return dict(map=scores, indices=indices, cls=t[:, 0], dense=dense)
