"""PrefixIndex: equivalence with a brute-force set-of-prefixes lookup, full-path walks, invalid propagation, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_dist.sid.prefix_index import PrefixIndex

# ---------------------------------------------------------------------------------------------- brute force


def brute_force(ids: list[tuple[int, ...]]):
    """Per length l: sorted list of distinct prefixes (node id = position) and prefix -> set of next codes."""
    num_levels = len(ids[0])
    prefixes = [sorted({item[:length] for item in ids}) for length in range(num_levels + 1)]
    next_codes = {}
    for item in ids:
        for level in range(num_levels):
            next_codes.setdefault(item[:level], set()).add(item[level])
    return prefixes, next_codes


@st.composite
def catalogues(draw):
    """Random unique catalogue with non-power-of-2 codebooks, plus random (valid and invalid) prefixes."""
    num_levels = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.sampled_from([1, 3, 5, 6, 7, 11]), min_size=num_levels, max_size=num_levels))
    code_tuple = st.tuples(*[st.integers(0, k - 1) for k in sizes])
    ids = draw(st.lists(code_tuple, min_size=1, max_size=40, unique=True))
    # Queries draw codes from [-1, K]: -1 and K are out of range, the rest may or may not be a real child.
    query_code = st.tuples(*[st.integers(-1, k) for k in sizes])
    queries = draw(st.lists(query_code, min_size=1, max_size=30))
    queries += draw(st.lists(st.sampled_from(ids), min_size=1, max_size=10))  # valid queries
    for item in draw(st.lists(st.sampled_from(ids), min_size=1, max_size=10)):  # near misses: one code changed
        level = draw(st.integers(0, num_levels - 1))
        queries.append(item[:level] + (draw(st.integers(-1, sizes[level])),) + item[level + 1 :])
    dense_levels = draw(st.sampled_from([0, 1, 2]))
    window_max_fanout = draw(st.sampled_from([0, 2, 64]))  # 0: every CSR advance binary-searches; 64: none does
    return ids, sizes, queries, dense_levels, window_max_fanout


# ------------------------------------------------------------------------------------------ equivalence


@settings(max_examples=120, deadline=None)
@given(catalogues())
def test_matches_brute_force_sets(case):
    ids, sizes, queries, dense_levels, window_max_fanout = case
    index = PrefixIndex.build(torch.tensor(ids), sizes, dense_levels, window_max_fanout)
    prefixes, next_codes = brute_force(ids)
    item_of_id = {item: row for row, item in enumerate(ids)}
    for length in range(len(sizes) + 1):
        query = [q[:length] for q in queries]
        prefix_tensor = torch.tensor(query, dtype=torch.long).reshape(len(query), length)
        node = index.nodes_of_prefix(prefix_tensor)  # [B]
        # Node id = rank among sorted distinct prefixes of this length, -1 for a prefix no item has.
        known = set(prefixes[length])
        expected = [prefixes[length].index(q) if q in known else -1 for q in query]
        assert node.tolist() == expected
        if length == len(sizes):
            assert index.item_of(node).tolist() == [item_of_id.get(q, -1) for q in query]
            continue
        allowed = index.allowed_codes(length, node)  # [B, K]
        assert allowed.shape == (len(query), sizes[length])
        for row, q in enumerate(query):
            assert set(allowed[row].nonzero().flatten().tolist()) == next_codes.get(q, set())
        # One more code: the full-length query code at this level, in [-1, K], valid or not.
        code = torch.tensor([q[length] for q in queries])
        child = index.advance(length, node, code)  # [B]
        longer = [q[: length + 1] for q in queries]
        known = set(prefixes[length + 1])
        assert child.tolist() == [prefixes[length + 1].index(q) if q in known else -1 for q in longer]


@settings(max_examples=60, deadline=None)
@given(catalogues())
def test_statistics_match_brute_force(case):
    ids, sizes, _, dense_levels, window_max_fanout = case
    index = PrefixIndex.build(torch.tensor(ids), sizes, dense_levels, window_max_fanout)
    prefixes, next_codes = brute_force(ids)
    assert index.dense_levels == min(dense_levels, len(sizes))
    for level in range(len(sizes)):
        fanout = [len(next_codes[p]) for p in prefixes[level]]  # in node-id order
        assert index.num_children(level).tolist() == fanout
        assert index.max_fanout(level) == max(fanout)
        assert index.num_nodes(level) == len(prefixes[level])
    assert index.num_nodes(len(sizes)) == len(ids)


@pytest.mark.parametrize(("dense_levels", "window_max_fanout"), [(0, 0), (0, 32), (1, 0), (2, 32), (3, 0), (4, 0)])
def test_walking_every_item_from_the_root_yields_that_item(dense_levels, window_max_fanout):
    sizes = [7, 5, 9, 6]  # 7*5*9*6 = 1890 possible IDs; take 1500 of them, so most prefixes are shared
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(7 * 5 * 9 * 6, generator=gen)[:1500]  # unique mixed-radix IDs
    codes = torch.stack([(flat // d) % k for d, k in zip([270, 54, 6, 1], sizes)], 1)  # [N, 4]
    index = PrefixIndex.build(codes, sizes, dense_levels, window_max_fanout)
    node = index.root(codes.shape[0])
    for level in range(4):
        allowed = index.allowed_codes(level, node)
        assert allowed[torch.arange(codes.shape[0]), codes[:, level]].all()  # own next code is always allowed
        node = index.advance(level, node, codes[:, level])
        assert (node >= 0).all()
    assert torch.equal(index.item_of(node), torch.arange(codes.shape[0]))
    assert torch.equal(index.nodes_of_prefix(codes), node)


# ------------------------------------------------------------------------------------- worked example


@pytest.mark.parametrize("dense_levels", [0, 1, 2])
def test_worked_example(dense_levels):
    # Items: row 0 = (2, 0), row 1 = (0, 2), row 2 = (0, 1); K = 3.
    # Level-1 nodes (sorted prefixes): (0,) -> 0, (2,) -> 1. Leaves (sorted IDs): (0,1) -> 0, (0,2) -> 1, (2,0) -> 2.
    index = PrefixIndex.build(torch.tensor([[2, 0], [0, 2], [0, 1]]), 3, dense_levels=dense_levels)
    root = index.root(1)
    assert index.allowed_codes(0, root).tolist() == [[True, False, True]]  # codes 0 and 2 start an item
    node = index.advance(0, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3]))
    assert node.tolist() == [0, -1, 1, -1]  # code 1 has no item; code 3 is out of range
    assert index.allowed_codes(1, node).tolist() == [
        [False, True, True],  # after (0,): 1 and 2
        [False, False, False],  # dead beam
        [True, False, False],  # after (2,): 0
        [False, False, False],
    ]
    leaf = index.advance(1, node, torch.tensor([2, 2, 0, 0]))
    assert leaf.tolist() == [1, -1, 2, -1]
    assert index.item_of(leaf).tolist() == [1, -1, 0, -1]  # (0,2) is row 1, (2,0) is row 0
    assert index.num_children(0).tolist() == [2] and index.num_children(1).tolist() == [2, 1]
    assert [index.max_fanout(0), index.max_fanout(1)] == [2, 2]
    assert index.stats()["layout"] == ["dense"] * dense_levels + ["csr+window"] * (2 - dense_levels)
    # Bytes: dense level = mask [nodes + 1 sentinel, 3] bool + child [nodes + 1, 3] int32 = 15 B per row;
    # CSR level = offsets [nodes + 1] int32 + child codes [children + max_fanout 2] uint8; leaf_item [3] int32.
    #   dense 0: level 0 CSR = 2*4 + 2+2 = 12,  level 1 CSR = 3*4 + 3+2 = 17,  total 12 + 17 + 12 = 41
    #   dense 1: level 0 dense = 2*15 = 30,     level 1 CSR = 17,              total 30 + 17 + 12 = 59
    #   dense 2: level 0 dense = 30,            level 1 dense = 3*15 = 45,     total 30 + 45 + 12 = 87
    assert index.nbytes() == {0: 41, 1: 59, 2: 87}[dense_levels]
    assert index.build_seconds >= 0.0


@pytest.mark.parametrize("window_max_fanout", [0, 32])  # binary search / window compare on the CSR levels
def test_invalid_nodes_and_codes_stay_invalid(window_max_fanout):
    codes = torch.tensor([[0, 1, 2], [1, 1, 0], [1, 2, 2], [1, 2, 3]])
    index = PrefixIndex.build(codes, [2, 3, 4], dense_levels=1, window_max_fanout=window_max_fanout)
    dead = torch.full((3,), -1)
    for level in range(3):
        assert not index.allowed_codes(level, dead).any()
        assert index.advance(level, dead, torch.tensor([0, 1, 2])).tolist() == [-1, -1, -1]
        # Node ids past the level's node count are invalid as well (levels 0, 1, 2 have 1, 2, 3 nodes).
        too_big = torch.tensor([index.num_nodes(level), 99])
        assert not index.allowed_codes(level, too_big).any()
        assert index.advance(level, too_big, torch.tensor([0, 0])).tolist() == [-1, -1]
    # Leaves (sorted IDs): (0,1,2) -> 0, (1,1,0) -> 1, (1,2,2) -> 2, (1,2,3) -> 3.
    assert index.item_of(torch.tensor([-1, 4, 2, 3])).tolist() == [-1, -1, 2, 3]
    # Level-2 nodes (0,1) {2}, (1,1) {0}, (1,2) {2, 3}: max fan-out 2, so the window of node (1,1) also covers the
    # first child of the NEXT node (1,2), code 2, and a binary search for 2 at (1,1) ends on that same slot.
    # Code 2 after (1,1) must still be rejected.
    assert index.nodes_of_prefix(torch.tensor([[1, 1, 2], [0, 1, 2], [1, 1, 0]])).tolist() == [-1, 0, 1]
    allowed = index.allowed_codes(2, torch.tensor([1, 2]))  # nodes (1,1) and (1,2), K = 4
    assert allowed.tolist() == [[True, False, False, False], [False, False, True, True]]
    # Out-of-range codes at a valid node give -1, never an index error or a wrap-around.
    root = index.root(4)
    assert index.advance(0, root, torch.tensor([-1, 2, -5, 1])).tolist() == [-1, -1, -1, 1]


def test_node_and_code_dtypes_and_move():
    index = PrefixIndex.build(torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), 3)
    node = index.advance(0, torch.tensor([0, 0], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.uint8))
    assert node.dtype == torch.long and node.tolist() == [1, -1]
    moved = index.to("cpu")
    assert moved.nodes_of_prefix(torch.tensor([[2, 0], [0, 1]])).tolist() == [1, 0]
    assert moved.nbytes() == index.nbytes() and moved.device.type == "cpu"


def test_large_codebook_and_packed_key_overflow_path():
    # K = 40000 over 5 levels: 40000**5 > 2**63, so the build radix-sorts column by column; codes need int32/int16.
    codes = torch.tensor([[39999, 0, 5, 5, 5], [0, 39999, 5, 5, 5], [0, 39999, 5, 5, 4]])
    index = PrefixIndex.build(codes, 40000, dense_levels=1, window_max_fanout=0)
    assert index.item_of(index.nodes_of_prefix(codes)).tolist() == [0, 1, 2]
    assert index.nodes_of_prefix(codes[:, :2]).tolist() == [1, 0, 0]
    assert index.allowed_codes(1, torch.tensor([0]))[0].nonzero().flatten().tolist() == [39999]  # after (0,)


def test_lookups_do_not_sync_with_the_host(monkeypatch):
    # A host sync would show up as a Tensor -> Python conversion; forbid them all during the lookups.
    codes = torch.tensor([[0, 1, 2], [1, 1, 0], [1, 2, 2]])
    indexes = [PrefixIndex.build(codes, 3, dense_levels=d, window_max_fanout=w) for d in (0, 1, 3) for w in (0, 32)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in a lookup")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    for index in indexes:
        node = index.root(3)
        for level in range(3):
            index.allowed_codes(level, node)
            node = index.advance(level, node, codes[:, level])
        index.item_of(node)
        index.nodes_of_prefix(codes[:, :2])
    monkeypatch.undo()
    assert all(torch.equal(index.item_of(index.nodes_of_prefix(codes)), torch.arange(3)) for index in indexes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_sync():
    gen = torch.Generator().manual_seed(1)
    flat = torch.randperm(13**3, generator=gen)[:1000]
    codes = torch.stack([flat // 169, (flat // 13) % 13, flat % 13], 1)
    cpu = PrefixIndex.build(codes, 13, dense_levels=1, window_max_fanout=0)  # CSR levels binary-search
    gpu = PrefixIndex.build(codes.cuda(), 13, dense_levels=1, window_max_fanout=0)
    queries = torch.randint(-1, 14, (512, 3), generator=gen)
    torch.cuda.set_sync_debug_mode("error")
    try:
        node = gpu.nodes_of_prefix(queries[:, :2].cuda())
        allowed = gpu.allowed_codes(2, node)
        items = gpu.item_of(gpu.advance(2, node, queries[:, 2].cuda()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_node = cpu.nodes_of_prefix(queries[:, :2])
    assert torch.equal(node.cpu(), cpu_node)
    assert torch.equal(allowed.cpu(), cpu.allowed_codes(2, cpu_node))
    assert torch.equal(items.cpu(), cpu.item_of(cpu.advance(2, cpu_node, queries[:, 2])))


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("codes", "sizes", "match"),
    [
        (
            torch.tensor([[0, 1], [2, 0], [0, 1], [2, 0]]),  # rows 2 and 3 repeat rows 0 and 1
            3,
            r"2 duplicate rows: rows 0 and 2 share ID \(0, 1\); rows 1 and 3 share ID \(2, 0\)",
        ),
        (torch.tensor([[0, 3], [1, 1]]), 3, r"row 0 level 1 = 3 \(K=3\)"),
        (torch.tensor([[0, 1], [-1, 1]]), 3, r"non-negative.*row 1 level 0 = -1"),
        (torch.tensor([[0, 4], [1, 1]]), [2, 5], None),  # in range for K = (2, 5): no error
        (torch.tensor([[2, 0]]), [2, 5], r"row 0 level 0 = 2 \(K=2\)"),
        (torch.zeros(3, 0, dtype=torch.long), 3, r"at least one level \(L >= 1\)"),
        (torch.zeros(0, 2, dtype=torch.long), 3, r"empty catalogue"),
        (torch.zeros(3, dtype=torch.long), 3, r"2-D integer tensor"),
        (torch.zeros(2, 2), 3, r"integer dtype"),
        (torch.tensor([[0, 1]]), [3], r"codebook_sizes has 1 entries, codes has L=2"),
        (torch.tensor([[0, 1]]), [3, 0], r"codebook_sizes\[1\] must be an int >= 1"),
        (torch.tensor([[0, 1]]), "3", r"codebook_sizes must be an int or a list"),
    ],
)
def test_bad_catalogues_raise(codes, sizes, match):
    if match is None:
        assert PrefixIndex.build(codes, sizes).num_items == 2
        return
    with pytest.raises(ValueError, match=match):
        PrefixIndex.build(codes, sizes)


def test_bad_lookup_arguments_raise():
    index = PrefixIndex.build(torch.tensor([[0, 1], [2, 0]]), 3)
    with pytest.raises(ValueError, match=r"dense_levels must be an int >= 0"):
        PrefixIndex.build(torch.tensor([[0, 1]]), 3, dense_levels=-1)
    with pytest.raises(ValueError, match=r"window_max_fanout must be an int >= 0"):
        PrefixIndex.build(torch.tensor([[0, 1]]), 3, window_max_fanout=1.5)
    with pytest.raises(ValueError, match=r"level must be an int in \[0, 2\), got 2"):
        index.allowed_codes(2, index.root(1))
    with pytest.raises(ValueError, match=r"node must be a 1-D integer tensor"):
        index.allowed_codes(0, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"code must have an integer dtype"):
        index.advance(0, index.root(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"code shape \(3,\) must equal node shape \(2,\)"):
        index.advance(0, index.root(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prefix_codes has 3 levels, the index has L=2"):
        index.nodes_of_prefix(torch.zeros(1, 3, dtype=torch.long))
