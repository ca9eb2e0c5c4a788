"""Which ring rank holds which tokens of packed documents: equal tokens, equal work, little traffic.

Context parallelism exists to fit what one device cannot hold, so every ring
rank must hold its share of the *tokens* (activations, the per-token layers
around attention), and for speed its share of the attention *work* (visible
(query, key) pairs: causal, and the window's left side, by position inside the
document). A document held whole by one rank costs no transfer at all; a
document split over ranks makes its keys travel the ring. ``dispatch`` chooses,
for one packing, ring degree and window, which tokens each ring rank holds:

1. **Long documents are spread** over all R ranks, each rank an equal token
   share. Causal documents (and windowed ones whose share is shorter than the
   window) are split zigzag-wise, as TransformerEngine does, generalised to any
   work profile: rank after rank takes a slice from the front and one from the
   back of what is left, sized so that its work is its share
   (``_zigzag``); a windowed document whose share is at least the window is cut
   in R consecutive pieces instead, so that only the window's tail travels, one
   hop (``_consecutive``).
2. **The other documents are placed whole** (``_Filler``): longest first, each
   into the rank whose remaining (tokens, work) deficit points most its way, then
   moves and swaps between ranks repair the worst rank. The ranks' sets are laid
   end to end in rank order and cut at exactly the token counts left to fill, so
   tokens are exact; the at most R - 1 documents a cut falls in are split between
   two neighbouring ranks, their earlier part on the lower rank: one hop.
3. **Escalation.** If work is still out of bounds (max/mean above
   ``WORK_BOUND``), the heaviest whole documents are spread as well (1, 2, 4, ...
   of them, then the smallest such count found by bisection; every count in
   turn for packings of few documents, where balance is not monotonic in the
   count), and windowed documents cut consecutively go zigzag. Where no count
   reaches the bound (shares of a few tokens, where whole tokens cannot
   balance), the most balanced attempt is kept.

Tokens per ring rank are exactly ``split_lengths(S, R)`` (within one token);
work per ring rank is within ``WORK_BOUND`` of the mean whenever that can be
met. The result is a pure function of its arguments (the same on every rank,
no communication), cached; ``layout.py`` turns it into shard order. Each rank's
ranges that other ranks need come last in its local order (``_local_order``), so
that a ring sending only those rows could send one contiguous tail; today's
ring (``ring.py``) still sends the whole piece at every step it needs.

MagiAttention also balances by a solver (equal-size chunks dispatched to
ranks); TransformerEngine splits every document zigzag-wise over all ranks.
This design takes the per-document zigzag for what cannot stay whole and keeps
everything else whole, where no transfer is needed.
"""
import bisect
import functools

from .layout import split_lengths
from cpattn.kernels.mask import prefix_work, span_work

WORK_BOUND = 1.05  # max/mean of work per ring rank the dispatch aims within
SCAN_CANDIDATES = 64  # packings with at most this many whole-document candidates try every spread count


# ----------------------------------------------------------------------------- spread documents

def _zigzag(length, shares, left):
    """[(start, end) ...] per rank, positions inside one document of ``length`` tokens: rank r holds
    ``shares[r]`` tokens and, as near as one token's work, its share of the document's work.

    Rank after rank takes x tokens from the front and shares[r] - x from the back of what is
    left. Work only grows with the position inside a document, so the step's work falls as x
    grows: bisection finds the x closest to the rank's share of the work left. Where several x
    give the same work (a window's plateau), the most from the front, so a slice is one range."""
    lo, hi, left_work = 0, length, prefix_work(length, left)
    pieces = []
    for r, share in enumerate(shares):
        if r == len(shares) - 1:
            pieces.append([(lo, hi)] if hi > lo else [])
            break
        target = left_work * share / (hi - lo) if hi > lo else 0

        def work(x):
            return span_work(lo, lo + x, left) + span_work(hi - (share - x), hi, left)
        a, b = 0, share  # the first x whose work is <= target lies in [a, b]
        while a < b:
            mid = (a + b) // 2
            if work(mid) <= target:
                b = mid
            else:
                a = mid + 1
        x = min((c for c in (a - 1, a) if 0 <= c <= share), key=lambda c: (abs(work(c) - target), -c))
        if work(share) == work(x):
            x = share
        pieces.append([(s, e) for s, e in ((lo, lo + x), (hi - (share - x), hi)) if e > s])
        left_work -= work(x)
        lo, hi = lo + x, hi - (share - x)
    return pieces


def _consecutive(length, shares):
    """R consecutive pieces, rank r the r-th."""
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    return [[(bounds[r], bounds[r + 1])] if bounds[r + 1] > bounds[r] else [] for r in range(len(shares))]


# ----------------------------------------------------------------------------- whole documents

class _Filler:
    """Whole documents into R ranks with exact token counts ``capacities`` and work near ``targets``.

    ``place`` assigns documents to ranks (greedy, then repair); ``cut`` lays the ranks' sets end
    to end and cuts them at the capacities, splitting the documents the cuts fall in."""

    def __init__(self, capacities, targets):
        self.capacities, self.targets = capacities, targets
        ranks = len(capacities)
        self.token_scale = max(1.0, sum(capacities) / ranks)
        self.work_scale = max(1.0, sum(targets) / ranks)
        self.sets = [[] for _ in range(ranks)]
        self.tokens, self.work = [0] * ranks, [0] * ranks

    def _deviation(self, r, tokens=0, work=0):
        return max(abs(self.tokens[r] + tokens - self.capacities[r]) / self.token_scale,
                   abs(self.work[r] + work - self.targets[r]) / self.work_scale)

    def _add(self, r, doc, sign=1):
        self.tokens[r] += sign * doc[1]
        self.work[r] += sign * doc[2]
        if sign > 0:
            self.sets[r].append(doc)
        else:
            self.sets[r].remove(doc)

    def place(self, docs):
        """``docs``: (start, length, work), heaviest first."""
        ranks = range(len(self.capacities))
        for doc in docs:
            t, w = doc[1] / self.token_scale, doc[2] / self.work_scale

            def pull(r):  # how far rank r's remaining (tokens, work) deficit points towards this document
                return (t * (self.capacities[r] - self.tokens[r]) / self.token_scale
                        + w * (self.targets[r] - self.work[r]) / self.work_scale)
            self._add(max(ranks, key=pull), doc)
        self._repair()

    def _repair(self, rounds=64, good_enough=0.002, least_gain=0.001):
        """Moves and swaps between the worst rank and another while they lower the larger deviation of the
        two by at least ``least_gain`` of a mean share (smaller gains cost host time the cut does not repay:
        it makes the token counts exact anyway). A document's work grows with its length alone, so only the
        other rank's documents whose lengths (or works) are nearest the few that would cancel a deviation are
        tried (bisection)."""
        ranks = range(len(self.capacities))
        for r in ranks:
            self.sets[r].sort(key=lambda d: (d[1], d[0]))
        for _ in range(rounds):
            worst = max(ranks, key=self._deviation)
            now = self._deviation(worst)
            if now <= good_enough:
                return
            best = (now, None)
            for other in ranks:
                if other == worst:
                    continue
                pair = max(now, self._deviation(other))
                lengths = [d[1] for d in self.sets[other]]

                def consider(give, take):  # give: from worst to other; take: from other to worst
                    dt = (take[1] if take else 0) - (give[1] if give else 0)
                    dw = (take[2] if take else 0) - (give[2] if give else 0)
                    after = max(self._deviation(worst, dt, dw), self._deviation(other, -dt, -dw))
                    nonlocal best
                    if after < min(pair, best[0]) - least_gain:
                        best = (after, (other, give, take))
                for doc in self.sets[worst]:
                    consider(doc, None)
                    # lengths that would cancel the worst rank's token or work deviation, or the other's
                    wanted = (doc[1] + self.capacities[worst] - self.tokens[worst],
                              doc[1] - self.capacities[other] + self.tokens[other])
                    for length in wanted:
                        at = bisect.bisect_left(lengths, length)
                        for j in range(max(0, at - 1), min(len(lengths), at + 1)):
                            consider(doc, self.sets[other][j])
                # moves to the worst rank: the other's documents nearest what it lacks, in tokens or in work
                works = [d[2] for d in self.sets[other]]
                for values, lacking in ((lengths, self.capacities[worst] - self.tokens[worst]),
                                        (works, self.targets[worst] - self.work[worst])):
                    at = bisect.bisect_left(values, lacking)
                    for j in range(max(0, at - 1), min(len(values), at + 1)):
                        consider(None, self.sets[other][j])
            if best[1] is None:
                return
            other, give, take = best[1]
            if give is not None:
                self._move(give, worst, other)
            if take is not None:
                self._move(take, other, worst)

    def _move(self, doc, source, target):
        self._add(source, doc, -1)
        self._add(target, doc)
        self.sets[target].sort(key=lambda d: (d[1], d[0]))

    def cut(self):
        """Per rank [(start, length)] of whole documents and of parts of the documents the cuts fall in:
        each rank's set ordered small, large, small (so a cut moves little work), sets end to end."""
        sequence = []
        for docs in self.sets:
            ordered = sorted(docs, key=lambda d: (d[1], d[0]))
            sequence += ordered[0::2] + ordered[1::2][::-1]
        pieces, r, room = [[] for _ in self.capacities], 0, None
        for start, length, _ in sequence:
            while length:
                while room is None or room == 0:
                    r = 0 if room is None else r + 1
                    room = self.capacities[r]
                take = min(room, length)
                pieces[r].append((start, take))
                start, length, room = start + take, length - take, room - take
        return pieces


# ----------------------------------------------------------------------------- the dispatch

def _documents(packing):
    return [(a, b - a) for a, b in zip(packing, packing[1:]) if b > a]


def _token_shares(length, ring_degree, turn):
    """The document's tokens over the ranks, the extra tokens of its remainder given round-robin from
    rank ``turn`` on (so that extras of many documents do not pile up on the first ranks)."""
    base, extra = divmod(length, ring_degree)
    shares = [base] * ring_degree
    for i in range(extra):
        shares[(turn + i) % ring_degree] += 1
    return shares, (turn + extra) % ring_degree


def _attempt(docs, spread, zigzag, ring_degree, targets, left):
    """Per rank [(start, length)] (spread parts, then filler pieces) and per rank work, for the documents
    at indices ``spread`` spread over all ranks (zigzag-wise for those in ``zigzag``)."""
    pieces = [[] for _ in range(ring_degree)]
    work = [0] * ring_degree
    tokens = [0] * ring_degree
    turn = 0
    for i in sorted(spread):
        start, length, _ = docs[i]
        shares, turn = _token_shares(length, ring_degree, turn)
        parts = _zigzag(length, shares, left) if i in zigzag else _consecutive(length, shares)
        for r, ranges in enumerate(parts):
            for a, b in ranges:
                pieces[r].append((start + a, b - a))
                work[r] += span_work(a, b, left)
                tokens[r] += b - a
    mean_work = sum(d[2] for d in docs) / ring_degree
    filler = _Filler([t - n for t, n in zip(targets, tokens)], [mean_work - w for w in work])
    filler.place([d for i, d in enumerate(docs) if i not in spread])
    for r, ranges in enumerate(filler.cut()):
        pieces[r] += ranges
    return pieces


def _work_per_rank(pieces, packing, left):
    work = []
    for ranges in pieces:
        total = 0
        for start, length in ranges:
            doc = packing[bisect.bisect_right(packing, start) - 1]
            total += span_work(start - doc, start + length - doc, left)
        work.append(total)
    return work


def _imbalance(work):
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def cut_window(packing, window_left):
    """The window the dispatch balances for: ``window_left``, or -1 when it is unbounded or no shorter
    than the longest document (the same cut, so one cache entry and one answer to "same window?")."""
    longest = max(b - a for a, b in zip(packing, packing[1:]))
    return window_left if 0 <= window_left < longest - 1 else -1


@functools.lru_cache(maxsize=64)
def dispatch(packing, ring_degree, window_left=-1):
    """Per ring rank, the (global start, length) ranges of the tokens it holds, in local order: whole
    documents first, then the parts of documents split over ranks (those whose keys travel).

    ``packing``: the global cu_seqlens as a tuple (0 first, the length last); ``window_left``: the left
    side of the causal window the attention will use (-1: unbounded). See the module docstring."""
    seq_len = packing[-1]
    if ring_degree == 1:
        return (((0, seq_len),),)
    left = cut_window(packing, window_left)
    docs = [(start, length, prefix_work(length, left)) for start, length in _documents(packing)]
    targets = split_lengths(seq_len, ring_degree)
    mean_work = sum(d[2] for d in docs) / ring_degree
    # heaviest first (ties: the earlier document), the order filler and escalation take them in
    order = sorted(range(len(docs)), key=lambda i: (-docs[i][2], docs[i][0]))
    # too long for a rank, or heavier than a rank may be: never whole
    must = {i for i in order if docs[i][1] > min(targets) or docs[i][2] > WORK_BOUND * mean_work}

    def windowed_fits(i):  # a spread document whose share is at least the window: consecutive pieces
        return left >= 0 and docs[i][1] // ring_degree >= left

    def attempt(extra_count, consecutive=True):
        """(work max/mean, pieces, whether some spread document was cut consecutively)."""
        spread = must | set([i for i in order if i not in must][:extra_count])
        zigzag = {i for i in spread if not (consecutive and windowed_fits(i))}
        pieces = _attempt(docs, spread, zigzag, ring_degree, targets, left)
        return _imbalance(_work_per_rank(pieces, packing, left)), pieces, zigzag != spread

    candidates = len(docs) - len(must)
    tried = {}

    def good(extra_count):
        if extra_count not in tried:
            for consecutive in (True, False):
                balance, pieces, some_consecutive = attempt(extra_count, consecutive)
                if balance <= WORK_BOUND or not some_consecutive:  # or the retry would be the same attempt
                    tried[extra_count] = (balance, pieces)
                    break
        return tried[extra_count][0] <= WORK_BOUND

    # Balance is not monotonic in the count when documents are few and short (a cut through a short
    # document moves much of a rank's work): there every small count is tried in turn. Otherwise
    # 0, 1, 2, 4, ... until one count is balanced, then the least such count by bisection.
    count, previous = 0, -1
    if candidates <= SCAN_CANDIDATES:
        while not good(count) and count < candidates:
            count += 1
    while not good(count) and count < candidates:
        previous, count = count, min(candidates, max(1, 2 * count))
    if good(count) and previous >= 0:
        lo, hi = previous + 1, count
        while lo < hi:
            mid = (lo + hi) // 2
            if good(mid):
                hi = mid
            else:
                lo = mid + 1
        count = hi
    if not good(count):  # nothing reaches the bound (tiny shares): the most balanced tried
        count = min(tried, key=lambda c: (tried[c][0], c))
    return _local_order(tried[count][1], packing, left)


def _local_order(pieces, packing, left):
    """Per rank the ranges in local order: those no other rank needs first (whole documents in global
    order), those other ranks need last; globally adjacent neighbours merged."""
    holder = {}
    for r, ranges in enumerate(pieces):
        for start, length in ranges:
            doc = bisect.bisect_right(packing, start) - 1
            holder.setdefault(doc, []).append((start, start + length, r))
    ordered = []
    for r, ranges in enumerate(pieces):
        private, shared = [], []
        for start, length in sorted(ranges):
            doc = bisect.bisect_right(packing, start) - 1
            end = start + length
            # keys [start, end) other ranks' queries see: before their last position, within the window
            others = [(a, b) for a, b, owner in holder[doc] if owner != r and b > start]
            need_lo = end
            need_hi = start
            for a, b in others:
                q_first, q_last = max(a, start), b - 1
                lo = start if left < 0 else max(start, q_first - left)
                hi = min(end, q_last + 1)
                if lo < hi:
                    need_lo, need_hi = min(need_lo, lo), max(need_hi, hi)
            if need_lo >= need_hi:
                private.append((start, length))
                continue
            for a, b, into in ((start, need_lo, private), (need_lo, need_hi, shared), (need_hi, end, private)):
                if b > a:
                    into.append((a, b - a))
        merged = []
        for start, length in sorted(private) + sorted(shared):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        ordered.append(tuple(merged))
    return tuple(ordered)
