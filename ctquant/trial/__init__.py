"""Trial statistics from results.

In: results folders (or a manifest whose scans :mod:`ctquant.run.batch` quantifies), reader masks
or tables. Out: endpoint reports (:mod:`.endpoints`: change between time points, participants with
reduction, exact CIs, plots; :func:`.endpoints.run_cohort` is ``ctquant batch``) and reader agreement
(:mod:`.agreement`: Dice, surface distances, ICC, Bland-Altman, kappa; the statistics in :mod:`.stats`).
"""
