"""Beam search for both families, step for step the algorithm of transformers 5 (`GenerationMixin._beam_search`),
so that it returns the same tokens and the same sequence scores.

Per prompt, `num_beams` running hypotheses and `num_beams` finished ones are kept:
  1. every running beam proposes every token: score = running score + log_softmax(logits), after the score
     processors of generate.py (repetition penalty, n-gram blocking, minimum length) (B, nb * V);
  2. the top K = 2 * nb candidates are taken (enough that nb of them do not end, even if nb end with EOS);
  3. the best nb candidates that did not just end (EOS, or the length limit) keep running;
  4. candidates that just ended, among the top nb, compete with the finished ones on score / new_len**length_penalty;
  5. stop when no running beam can beat the worst finished one (the heuristic depends on early_stopping: True
     stops as soon as nb hypotheses are finished), or when every candidate ended.
Scores below -1e9 mark "not allowed" exactly as transformers does, so ties resolve the same way.
"""
import torch

from .generate import GenerationOptions, check_logits, left_padding, process_scores

NEG = -1.0e9


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) -> (B, k, ...) rows index (B, k) along dim 1."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(model, input_ids, attention_mask, opts: GenerationOptions, eos_id, pad_id, return_scores=False):
    """New tokens (B * num_return_sequences, N), best first per prompt, padded with pad_id after EOS.
    With return_scores: (tokens, scores (B * num_return_sequences,)), scores as transformers' sequences_scores."""
    nb, B = opts.num_beams, input_ids.shape[0]
    dev = input_ids.device
    if model.is_encoder_decoder:   # encode once per prompt, repeat the encoder output per beam
        logits, state = model.start(input_ids, attention_mask, opts.max_new_tokens, num_beams=nb)
    else:                          # repeat the prompt per beam before the prefill
        logits, state = model.start(input_ids.repeat_interleave(nb, 0), attention_mask.repeat_interleave(nb, 0),
                                    opts.max_new_tokens)
    check_logits(logits)
    P = state.history.shape[1]     # the decoder prompt: the prompt itself, or the decoder start token
    skip = left_padding(model, attention_mask)
    skip = None if skip is None else skip.repeat_interleave(nb, 0)                  # (B * nb,)
    max_len = P + opts.max_new_tokens
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else -1)
    K = 2 * nb
    top_nb = (torch.arange(K, device=dev) < nb)[None, :]                            # (1, K)

    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=dev)      # running hypotheses
    running[:, :, :P] = state.history.view(B, nb, P)
    finished = running.clone()                                                      # best finished hypotheses
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = NEG                     # all beams start identical: only the first one may expand
    finished_scores = torch.full((B, nb), NEG, device=dev)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    running_origin = torch.full((B, nb, opts.max_new_tokens), -1, dtype=torch.long, device=dev)  # beam per step
    finished_origin = running_origin.clone()
    batch_offset = torch.arange(B, device=dev)[:, None] * nb

    cur = P
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)                          # (B * nb, V)
        log_probs = process_scores(log_probs, running[:, :, :cur].reshape(B * nb, cur), skip, cur - P, opts, eos_id)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)

        # 2. the top K continuations over all beams of a prompt
        top_scores, top_index = torch.topk(log_probs, K)                               # (B, K)
        beam, token = top_index // V, top_index % V
        top_seqs = _gather(running, beam)
        top_seqs[:, :, cur] = token
        top_origin = _gather(running_origin, beam)
        top_origin[:, :, cur - P] = beam + batch_offset
        ended = (token == eos_id) if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
        ended = ended | (cur + 1 >= max_len)                                            # (B, K)

        # 3. the best nb candidates that go on
        go_on = top_scores + ended.float() * NEG
        keep = torch.topk(go_on, nb)[1]
        running, running_scores, running_origin = _gather(top_seqs, keep), _gather(go_on, keep), _gather(top_origin, keep)

        # 4. candidates that just ended (among the top nb) against the finished ones
        just_ended = ended & top_nb
        final = top_scores / ((cur + 1 - P) ** opts.length_penalty)
        final += (is_finished.all(-1, keepdim=True) & (opts.early_stopping is True)).float() * NEG
        final += (~improvable).float() * NEG
        final += (~just_ended) * NEG
        merged = torch.topk(torch.cat([finished_scores, final], 1), nb)[1]
        finished = _gather(torch.cat([finished, top_seqs], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, final], 1), merged)
        finished_origin = _gather(torch.cat([finished_origin, top_origin], 1), merged)
        is_finished = _gather(torch.cat([is_finished, just_ended], 1), merged)

        # 5. can a running beam still beat the worst finished one?
        reorder = running_origin[:, :, cur - P].reshape(-1)
        cur += 1
        best_len = (max_len if opts.early_stopping == "never" and opts.length_penalty > 0 else cur) - P
        best_running = running_scores[:, :1] / (best_len ** opts.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_full = bool(is_finished.all()) and opts.early_stopping is True
        if not improvable.any() or all_full or bool(ended.all()):
            break
        state.reorder(reorder)
        logits = model.step(state, running[:, :, cur - 1].reshape(-1))
    for cache in state.caches:                     # their buffers serve the next generation
        cache.release()

    n = opts.num_return_sequences
    origin = finished_origin[:, :n].reshape(B * n, -1)
    length = int((origin >= 0).sum(1).max())
    tokens = finished[:, :n].reshape(B * n, -1)[:, P:P + length]
    if return_scores:
        return tokens, finished_scores[:, :n].reshape(-1)
    return tokens
