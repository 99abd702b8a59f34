"""Reports: an experiment's records as tables (tables: frames, cells, provenance), LaTeX (latex),
figures (plots, heatmaps, saved by figures), the image gallery (gallery), the whole paper as
one PDF (paper) and the methods' display names and colours (display). The command line is
`python -m benchmark.report` (cli)."""
