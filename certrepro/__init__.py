"""certrepro: reproduce the tables of certified-robustness papers. The command line lives in
`certrepro.cli`; the library in `workers.core`."""
__version__ = "0.1.0"
