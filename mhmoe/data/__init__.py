"""Data: corpora and their files, readers, the tokenizer, the token cache, samplers, and `mhmoe data prepare`.

Pipeline: a named corpus (`corpora.CORPORA`) is a set of files under the data root (see `<root>/PROVENANCE.md`),
read by format-specific readers into documents (`documents.iter_documents`), tokenised once into a cached memmap
with an `eos` after every document (`cache.tokenize_corpus`), then consumed either as random training windows
(`sampler.TrainSampler`, a pure function of (seed, step) so that resuming needs only the step) or as fixed
evaluation windows (`sampler.eval_windows`).
"""
