"""The transformers patch the built-in recipes need for PT2E: an attention backend whose causal (+ padding)
mask is built by broadcasting, not torch.vmap (see `plain_attention_masks`)."""

from __future__ import annotations

BACKEND = "nsd_sdpa"


def plain_attention_masks(model) -> None:
    """Let decoder models build their causal (+ padding) attention mask without torch.vmap.

    transformers (4.5x) builds that mask with torch.vmap when tracing, so the mask lands in a PT2E graph as
    vmap bookkeeping ops with no users; PT2E's convert step (torchao's convert_pt2e) removes them as dead
    code and the quantized graph then fails to run ("tensor may have escaped from inside a function being
    vmapped"). So register an attention backend that is SDPA with the same mask made by broadcasting, and
    switch to it where the model goes through the attention interface. Same numbers (asserted in the
    tests)."""
    if (getattr(model.config, "_attn_implementation", None) != "sdpa"
            or not getattr(type(model), "_supports_attention_backend", False)):
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BACKEND, sdpa_attention_forward)
    AttentionMaskInterface.register(BACKEND, broadcast_mask)
    try:
        model.set_attn_implementation(BACKEND)
    except (ValueError, AttributeError, ImportError):
        pass  # the model keeps its own attention; weight-only configs work all the same


def broadcast_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                    local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' sdpa_mask (4.57) with the mask function evaluated on broadcast index tensors instead of
    under torch.vmap: a boolean (batch, 1, query, key) mask, True = attend, or None where SDPA's is_causal
    does the same (never while tracing, as in transformers)."""
    import torch
    from transformers import masking_utils as mu

    original = mask_function = mask_function or mu.causal_mask_function
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, cache_position.shape[0], kv_length,
                                                            kv_offset, local_size):
        return None
    if padding_mask is not None:
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.arange(1, device=device)[None, :, None, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    try:
        mask = mask_function(batch, head, cache_position[None, None, :, None], kv)
    except Exception:  # a mask function that needs vmap after all: transformers' own
        return mu.sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                            kv_offset=kv_offset, mask_function=original, attention_mask=attention_mask,
                            local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    return mask.to(torch.bool).expand(batch_size, 1, cache_position.shape[0], kv_length)

