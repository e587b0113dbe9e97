import torch

from rsitr.losses import same_image_mask, triplet_ranking_loss


def naive_loss(sims, image_ids, margin, hardest=False):
    b = len(image_ids)
    total = 0.0
    for i in range(b):
        caption_costs = [max(0.0, margin - sims[i, i] + sims[i, j]) for j in range(b) if image_ids[j] != image_ids[i]]
        image_costs = [max(0.0, margin - sims[i, i] + sims[j, i]) for j in range(b) if image_ids[j] != image_ids[i]]
        if hardest:
            total += max(caption_costs, default=0.0) + max(image_costs, default=0.0)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total / b


def test_matches_naive_definition_and_masks_same_image():
    torch.manual_seed(0)
    sims = torch.rand(6, 6)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    same = same_image_mask(ids)
    for hardest in (False, True):
        got = triplet_ranking_loss(sims, same, 0.2, "hardest" if hardest else "sum")
        assert torch.isclose(got, torch.tensor(naive_loss(sims.numpy(), ids.tolist(), 0.2, hardest), dtype=got.dtype))


def test_same_image_pair_is_not_a_negative():
    # captions 0 and 1 show the same image; scoring them equally must cost nothing
    sims = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert triplet_ranking_loss(sims, same_image_mask(torch.tensor([5, 5])), 0.2) == 0
    assert triplet_ranking_loss(sims, same_image_mask(torch.tensor([5, 6])), 0.2) > 0
