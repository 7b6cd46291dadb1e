"""One REBEL regression step on a toy batch with the fused op (the main job until engine/train.py lands).

    python examples/quickstart.py

Builds a random LM head, a REBEL batch of 2B responses (prompt positions masked out), records
log pi_old with the no-grad fused pass, then takes AdamW steps on the fused REBEL loss and prints
how the regression error falls. Runs on CPU in seconds, on CUDA with the Triton kernels.
"""
import torch

from rebel_kernels import fused_rebel_loss, fused_token_logprobs


def main(pairs: int = 4, prompt_len: int = 24, response_len: int = 8, hidden: int = 64, vocab: int = 1000):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, seq = 2 * pairs, prompt_len + response_len
    states = torch.randn(rows, seq, hidden, device=device)  # stands in for the model's last hidden states
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    labels = torch.randint(0, vocab, (rows, seq), device=device)
    labels[:, :prompt_len] = -100  # prompt tokens are not part of the response
    rewards = torch.randn(rows, device=device)
    with torch.no_grad():
        old = fused_token_logprobs(states, head.weight, labels)  # log pi_t, recorded once
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for step in range(40):
        loss = fused_rebel_loss(states, head.weight, labels, old, rewards)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  REBEL loss {loss.item():.4f}")
    print(f"device {device}: the loss starts at mean((r - r')^2) since the ratio is exactly 0, then falls")


if __name__ == "__main__":
    main()
