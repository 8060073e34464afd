"""The keep-masks of top-k / top-p / min-p on hand-made rows, boundaries and ties included."""

import torch

from pdserve.shared.engine.sampling.filters import min_p_mask, top_k_mask, top_k_sorted, top_p_mask


def _kept(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).view(-1).tolist()) for row in mask]


def test_top_k_keeps_exactly_k_with_lowest_ids_at_a_tie():
    x = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]] * 4)
    k = torch.tensor([2, 4, 1, 10])
    assert _kept(top_k_mask(x, k)) == [{1, 2}, {0, 1, 2, 3}, {1}, {0, 1, 2, 3, 4}]


def test_top_k_per_row_k_and_minus_inf_entries():
    x = torch.tensor([[0.5, -1.0, 2.0, 1.0], [float("-inf"), 0.0, float("-inf"), -2.0]])
    assert _kept(top_k_mask(x, torch.tensor([3, 3]))) == [{0, 2, 3}, {0, 1, 3}]


def test_top_k_sorted_orders_best_first_and_ties_by_id():
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, -1.0]])
    vals, ids = top_k_sorted(x, 4)
    assert vals.tolist() == [[2.0, 2.0, 1.0, 1.0]]
    assert ids.tolist() == [[1, 3, 2, 4]]
    vals, ids = top_k_sorted(x, 99)  # capped at V
    assert ids.tolist() == [[1, 3, 2, 4, 0, 5]]


def test_top_p_boundary_is_exact_and_ties_go_to_lowest_id():
    # Binary fractions, so the float sums are exact: sorted order is 1, 0, 2, 3.
    probs = torch.tensor([[0.25, 0.5, 0.125, 0.125]] * 6)
    top_p = torch.tensor([0.75, 0.8, 0.5, 0.51, 0.01, 1.0])
    assert _kept(top_p_mask(probs, top_p)) == [
        {0, 1},  # mass before id 2 is exactly 0.75: threshold already reached, id 2 dropped
        {0, 1, 2},  # id 2 crosses 0.8 and stays; its tie id 3 is not needed
        {1},
        {0, 1},  # id 0 crosses 0.51
        {1},  # the best token always stays
        {0, 1, 2, 3},
    ]


def test_top_p_on_unnormalised_mass_and_zero_entries():
    probs = torch.tensor([[0.0, 2.0, 1.0, 1.0]])  # mass 4, as after a top-k mask
    assert _kept(top_p_mask(probs, torch.tensor([0.6]))) == [{1, 2}]


def test_min_p_threshold_keeps_equal_values():
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.3], [0.4, 0.2, 0.1, 0.3], [0.4, 0.2, 0.1, 0.3]])
    assert _kept(min_p_mask(probs, torch.tensor([0.5, 0.0, 1.0]))) == [{0, 1, 3}, {0, 1, 2, 3}, {0}]


def test_top_p_with_support_matches_the_full_sort():
    g = torch.Generator().manual_seed(0)
    # Coarse values make many ties; zero all but each row's k best, as a top-k mask would.
    x = torch.randint(0, 6, (16, 40), generator=g).float()
    k = torch.randint(1, 12, (16,), generator=g)
    probs = torch.softmax(x.masked_fill(~top_k_mask(x, k), float("-inf")), dim=-1)
    top_p = torch.rand(16, generator=g) * 0.9 + 0.05
    full = top_p_mask(probs, top_p) & (probs > 0)
    assert torch.equal(top_p_mask(probs, top_p, support=int(k.max())), full)
    assert full.sum() < (probs > 0).sum()  # the nucleus cut something
