"""S3Gen's flow decoder (mel frames from the encoder's output and noise) without host reads.

Upstream's ``ConditionalDecoder.forward`` asks the device, in every block
(14 per estimator pass, 20 passes per vocoder call), whether some row of the
batch is wholly masked (``add_optional_chunk_mask``'s ``.item()``). On a GPU
each question waits for everything queued before it, so the host can never
run ahead of the device, and a CUDA graph cannot be captured at all.

``estimator_forward`` is that forward with the same fix-up done on the
device (``torch.where``: a wholly masked row attends everywhere, as upstream
sets it), and ``solve`` is upstream's solver around it: the cosine-scheduled
Euler steps with classifier-free guidance (``CausalConditionalCFM.solve_euler``)
or, for turbo's distilled vocoder, the plain mean-flow steps (``basic_euler``).
Both equal upstream bit for bit (tested); ``flow_graphs`` captures ``solve``.
"""

from __future__ import annotations

from typing import Optional

import torch


def sync_free_chunk_mask(x: torch.Tensor, mask: torch.Tensor, static_chunk_size: int) -> torch.Tensor:
    """``add_optional_chunk_mask(x, mask, False, False, 0, static_chunk_size, -1)`` as the
    decoder calls it, without its host read. A row with no position to attend to (a padded
    row of a ``flow_graphs`` bucket) attends to every position, as upstream means to: its
    fix-up assigns through a boolean index (a device read), after logging through a module
    it never imports (chatterbox-tts 0.1.7 raises ``NameError`` there)."""
    from chatterbox.models.s3gen.utils.mask import subsequent_chunk_mask

    chunk_mask = mask
    if static_chunk_size > 0:
        chunk_mask = mask & subsequent_chunk_mask(x.size(1), static_chunk_size, -1, x.device).unsqueeze(0)
    empty = (chunk_mask.sum(dim=-1) == 0).unsqueeze(-1)
    return torch.where(empty, True, chunk_mask)


def estimator_forward(decoder, x, mask, mu, t, spks=None, cond=None, r=None) -> torch.Tensor:
    """Upstream's ``ConditionalDecoder.forward`` (x, mu, cond: (B, 80, T); mask (B, 1, T);
    t, r: (B,); spks (B, 80)), with ``sync_free_chunk_mask``; same numbers."""
    from chatterbox.models.s3gen.decoder import mask_to_bias
    from einops import pack, rearrange, repeat

    t = decoder.time_embeddings(t).to(t.dtype)
    t = decoder.time_mlp(t)
    if decoder.meanflow:
        r = decoder.time_embeddings(r).to(t.dtype)
        r = decoder.time_mlp(r)
        t = decoder.time_embed_mixer(torch.cat([t, r], dim=1))
    x = pack([x, mu], "b * t")[0]
    if spks is not None:
        x = pack([x, repeat(spks, "b c -> b c t", t=x.shape[-1])], "b * t")[0]
    if cond is not None:
        x = pack([x, cond], "b * t")[0]

    def attend(x, blocks, block_mask):
        x = rearrange(x, "b c t -> b t c").contiguous()
        attn_mask = sync_free_chunk_mask(x, block_mask.bool(), decoder.static_chunk_size)
        attn_mask = mask_to_bias(attn_mask == 1, x.dtype)
        for block in blocks:
            x = block(hidden_states=x, attention_mask=attn_mask, timestep=t)
        return rearrange(x, "b t c -> b c t").contiguous()

    hiddens = []
    masks = [mask]
    for resnet, blocks, downsample in decoder.down_blocks:
        mask_down = masks[-1]
        x = attend(resnet(x, mask_down, t), blocks, mask_down)
        hiddens.append(x)  # for the skip connections
        x = downsample(x * mask_down)
        masks.append(mask_down[:, :, ::2])
    masks = masks[:-1]
    mask_mid = masks[-1]
    for resnet, blocks in decoder.mid_blocks:
        x = attend(resnet(x, mask_mid, t), blocks, mask_mid)
    for resnet, blocks, upsample in decoder.up_blocks:
        mask_up = masks.pop()
        skip = hiddens.pop()
        x = pack([x[:, :, :skip.shape[-1]], skip], "b * t")[0]
        x = attend(resnet(x, mask_up, t), blocks, mask_up)
        x = upsample(x * mask_up)
    x = decoder.final_block(x, mask_up)
    return decoder.final_proj(x * mask_up) * mask


def solve(cfm, x, t_span, mu, mask, spks, cond, *, meanflow: bool) -> torch.Tensor:
    """The flow decoder's whole solve from noise ``x`` (B, 80, T) over ``t_span`` (steps + 1,):
    upstream's ``solve_euler`` (guidance rows batched after the conditioned ones) or, for a
    mean-flow vocoder, its ``basic_euler`` (no guidance, each step told its end time)."""
    from chatterbox.models.s3gen.flow_matching import cast_all

    estimator = cfm.estimator
    in_dtype = x.dtype
    x, t_span, mu, mask, spks, cond = cast_all(x, t_span, mu, mask, spks, cond, dtype=estimator.dtype)
    if meanflow:
        for t, r in zip(t_span[:-1], t_span[1:]):
            # One time per row: (1,) as upstream for one call, (B,) for a batch of calls.
            t, r = t.expand(x.shape[0]), r.expand(x.shape[0])
            dxdt = estimator_forward(estimator, x, mask=mask, mu=mu, t=t, spks=spks, cond=cond, r=r)
            x = x + (r - t).view(-1, 1, 1) * dxdt
        return x.to(in_dtype)
    rows, frames = mu.size(0), x.size(2)
    # Rows [0, B) are conditioned, [B, 2B) unconditioned (zero mu, speaker and
    # prompt), filled in place as upstream does (it warns that a concatenation
    # may change the memory format).
    x_in = torch.zeros([2 * rows, 80, frames], device=x.device, dtype=x.dtype)
    mask_in = torch.zeros([2 * rows, 1, frames], device=x.device, dtype=x.dtype)
    mu_in = torch.zeros([2 * rows, 80, frames], device=x.device, dtype=x.dtype)
    t_in = torch.zeros([2 * rows], device=x.device, dtype=x.dtype)
    spks_in = torch.zeros([2 * rows, 80], device=x.device, dtype=x.dtype)
    cond_in = torch.zeros([2 * rows, 80, frames], device=x.device, dtype=x.dtype)
    rate = cfm.inference_cfg_rate
    for t, r in zip(t_span[:-1], t_span[1:]):
        t, r = t.unsqueeze(dim=0), r.unsqueeze(dim=0)
        x_in[:rows] = x_in[rows:] = x
        mask_in[:rows] = mask_in[rows:] = mask
        mu_in[:rows] = mu
        t_in[:rows] = t_in[rows:] = t
        spks_in[:rows] = spks
        cond_in[:rows] = cond
        dxdt = estimator_forward(estimator, x_in, mask=mask_in, mu=mu_in, t=t_in, spks=spks_in,
                                 cond=cond_in)
        dxdt, cfg_dxdt = torch.split(dxdt, [rows, rows], dim=0)
        dxdt = (1.0 + rate) * dxdt - rate * cfg_dxdt
        x = x + (r - t) * dxdt
    return x.to(in_dtype)


def time_span(steps: int, *, meanflow: bool, device, dtype) -> torch.Tensor:
    """The solver's ``steps + 1`` times in [0, 1]: upstream's cosine schedule, linear for mean flow."""
    t_span = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
    return t_span if meanflow else 1 - torch.cos(t_span * 0.5 * torch.pi)


def flow_solve(cfm, x, mu, mask, spks, cond, *, steps: int, meanflow: bool,
               graphs: Optional["object"] = None) -> torch.Tensor:
    """``solve`` over ``steps`` steps; under CUDA graphs where ``graphs`` (``FlowGraphs``) is given."""
    if graphs is not None:
        return graphs.solve(x, mu, mask, spks, cond, steps=steps)
    t_span = time_span(steps, meanflow=meanflow, device=x.device, dtype=mu.dtype)
    return solve(cfm, x, t_span, mu, mask, spks, cond, meanflow=meanflow)
