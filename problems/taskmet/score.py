"""Normalised decision quality (Shah et al. 2022)."""
import torch


@torch.no_grad()
def decision_quality(task, yhat, split, n_rand=10, seed=987654321):
    """DQ = (obj(z(yhat)) - obj(z(rand))) / (obj(z(y)) - obj(z(rand))), each the mean over the
    split's instances, rand = U[0, 1) predictions averaged over n_rand draws (their own seed,
    distinct from the data seeds). 1 = the decisions
    of the true labels, 0 = random ones."""
    y, aux = task.Y[split], task.aux[split]

    def value(pred):
        return float(task.objective(y, task.decide_test(pred, aux), aux).mean())

    g = torch.Generator().manual_seed(seed)
    rand = sum(value(torch.rand(y.shape, generator=g, dtype=y.dtype)) for _ in range(n_rand)) / n_rand
    return (value(yhat) - rand) / (value(y) - rand)
