"""The study: experiments as data, sweeps, reproduce, the report, the runs table, compare, eval/predict."""
