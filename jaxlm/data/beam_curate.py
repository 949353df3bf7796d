"""Read and curate on Apache Beam: the part of ``beam.build`` that removes documents.

``curated(p, plan, srcs, reserved)`` adds to a Beam pipeline the steps the local path's
``curate.Curator`` does while streaming, with the same ``curate.Rules``; the two dedup indexes
that a stream keeps by remembering become group-bys here:

1. read: one task per input file (``sources.read_file``), documents keyed by their place in
   the corpus ``(file number, document number)`` — the order the local path streams them in;
2. exact dedup: group by ``curate.exact_key``; the earliest document of each group survives;
3. quality (``Rules.screen``) and MinHash; near dedup groups by LSH band key, compares the
   signatures within each bucket, and ``minhash.near_duplicates`` replays keep-first over the
   similar pairs of a dataset (one worker holds only those pairs);
4. PII scrub (``Rules.scrub``).

Every count the curation report needs leaves as an event ``(key, (documents, bytes))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections

from jaxlm.data import content_split, curate, minhash, sources


def nbytes(text: str) -> int:
    """UTF-8 size of a document, as the curation report and the manifest count it."""
    return len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------- per-element steps
# Module-level functions and small classes, so every runner can pickle them.


def _event(*key: str, docs: int = 1, nbytes: int = 0) -> Any:
    """A count for the curation report, on the side output ``events``: summed per key."""
    import apache_beam as beam

    return beam.pvalue.TaggedOutput("events", (key, (docs, nbytes)))


# --------------------------------------------------------------------------- per-element steps
# Module-level functions and small classes, so every runner can pickle them.


class _Read:
    """Reads one file: documents ``(ds, (file, doc), text)``, problems and counts on the side."""

    def __init__(self, fields: dict[str, tuple[str, str, int]], reserved: dict[bytes, str]) -> None:
        self.fields, self.reserved = fields, reserved  # ds -> (text_field, split, max bytes)

    def __call__(self, item: tuple[str, int, sources.SourceFile]) -> Iterator[Any]:
        import apache_beam as beam

        ds, file_no, f = item
        problems = sources.Problems()
        text_field, split, max_bytes = self.fields[ds]
        docs = sources.read_file(f, problems, text_field, split, max_bytes)
        for doc_no, doc in enumerate(docs):
            text = doc["text"]
            held_by = self.reserved.get(content_split.text_digest(text)) if self.reserved else None
            if held_by is not None:  # a validation document: never trained on
                yield _event("reserved", ds, held_by)
                continue
            yield _event("in", ds, nbytes=nbytes(text))
            yield ds, (file_no, doc_no), text
        for p in problems.to_list():
            yield beam.pvalue.TaggedOutput("problems", (ds, p))


def _exact_key(doc: tuple[str, tuple[int, int], str]) -> tuple[tuple[str, bytes], Any]:
    ds, order, text = doc
    return (ds, curate.exact_key(text.lower().split())), (order, text)


def _keep_first(item: tuple[tuple[str, bytes], Iterable[Any]]) -> Iterator[Any]:

    (ds, _), docs = item
    docs = sorted(docs)
    for _, text in docs[1:]:
        yield _event("removed", ds, "exact_dedup", nbytes=nbytes(text))
    yield ds, docs[0][0], docs[0][1]


class _Screen:
    """Quality rules and the MinHash signature, with each dataset's rules built once."""

    def __init__(self, curation: dict[str, Any], presets: dict[str, str | None]) -> None:
        self.curation, self.presets = curation, presets
        self._rules: dict[str, curate.Rules] = {}

    def rules(self, ds: str) -> curate.Rules:
        if ds not in self._rules:
            cfg = ml_collections.ConfigDict(self.curation)
            self._rules[ds] = curate.Rules(cfg, self.presets[ds])
        return self._rules[ds]

    def __call__(self, doc: tuple[str, tuple[int, int], str]) -> Iterator[Any]:

        ds, order, text = doc
        rule, sig = self.rules(ds).screen(text, text.lower().split())
        if rule is not None:
            yield _event("removed", ds, rule, nbytes=nbytes(text))
            return
        yield ds, order, text, sig


def _bands(doc: tuple[str, Any, str, Any], screen: _Screen) -> Iterator[Any]:
    ds, order, _, sig = doc
    if sig is None:
        return
    for band, key in enumerate(screen.rules(ds).minhash.band_keys(sig)):
        yield (ds, band, key), (order, sig.tobytes())


def _similar_pairs(item: tuple[tuple[str, int, bytes], Iterable[Any]], screen: _Screen) -> Iterator:
    import numpy as np

    (ds, _, _), members = item
    members = sorted(members)
    if len(members) < 2:
        return
    minhash = screen.rules(ds).minhash
    sigs = [np.frombuffer(s, np.uint32) for _, s in members]
    for a in range(len(members)):
        for b in range(a + 1, len(members)):
            if minhash.similar(sigs[a], sigs[b]):
                yield ds, (members[a][0], members[b][0])


def _dropped(item: tuple[str, Iterable[Any]]) -> Iterator[tuple[tuple[str, Any], bool]]:
    ds, edges = item
    for order in minhash.near_duplicates(edges):
        yield (ds, order), True


def _scrub(item: tuple[tuple[str, Any], dict[str, list]], screen: _Screen) -> Iterator[Any]:

    (ds, order), joined = item
    for text in joined["doc"]:  # one, unless the key was not a document's
        if joined["dropped"]:
            yield _event("removed", ds, "near_dedup", nbytes=nbytes(text))
            continue
        text, counts = screen.rules(ds).scrub(text)
        for kind, n in counts.items():
            yield _event("pii", ds, kind, docs=n)
        yield _event("out", ds, nbytes=nbytes(text))
        yield ds, order, text


def curated(
    p: Any, plan: dict[str, Any], srcs: dict[str, sources.Source], reserved: dict[bytes, str]
) -> tuple[Any, list[Any], Any]:
    """Adds reading and curation to the pipeline ``p``.

    Args:
      p: the Beam pipeline.
      plan: ``beam.prepare_beam``'s plan (``curation`` and ``presets`` are read here).
      srcs: the datasets' sources, by name.
      reserved: text digest -> validation set, for documents never to train on.

    Returns:
      ``(docs, events, problems)``: the curated documents ``(ds, (file, doc), text)``, the
      PCollections of report events, and the input problems ``(ds, problem)``.
    """
    import apache_beam as beam

    fields = {ds: (src.text_field, src.split, src.max_document_bytes) for ds, src in srcs.items()}
    files = [(ds, i, f) for ds, src in srcs.items() for i, f in enumerate(src.files)]
    read = (
        p
        | "files" >> beam.Create(files)
        | "spread files" >> beam.Reshuffle()
        | "read"
        >> beam.FlatMap(_Read(fields, reserved)).with_outputs("events", "problems", main="docs")
    )
    events = [read.events]
    docs = read.docs
    if plan["curation"]["exact_dedup"]:
        exact = (
            docs
            | "exact key" >> beam.Map(_exact_key)
            | "group exact" >> beam.GroupByKey()
            | "keep first" >> beam.FlatMap(_keep_first).with_outputs("events", main="docs")
        )
        events.append(exact.events)
        docs = exact.docs
    screen = _Screen(plan["curation"], plan["presets"])
    screened = docs | "quality" >> beam.FlatMap(screen).with_outputs("events", main="docs")
    events.append(screened.events)
    edges = (
        screened.docs
        | "bands" >> beam.FlatMap(_bands, screen)
        | "group bands" >> beam.GroupByKey()
        | "similar pairs" >> beam.FlatMap(_similar_pairs, screen)
        | "group pairs" >> beam.GroupByKey()
        | "near duplicates" >> beam.FlatMap(_dropped)
    )
    keyed = screened.docs | "by place" >> beam.Map(lambda d: ((d[0], d[1]), d[2]))
    out = (
        {"doc": keyed, "dropped": edges}
        | "join dropped" >> beam.CoGroupByKey()
        | "scrub" >> beam.FlatMap(_scrub, screen).with_outputs("events", main="docs")
    )
    events.append(out.events)
    return out.docs, events, read.problems
