"""Files written from results.

In: a scan, its label images and measures (or folders of results). Out: files, always through the
one atomic writer (:mod:`.atomic`): the QC montage (:mod:`.qc`), per-scan and cohort HTML reports
(:mod:`.reports`, templates in ``templates/``), DICOM SEG (:mod:`.dicomseg`) and DICOM SR
(:mod:`.dicomsr`) objects; :mod:`.columns` names the table columns reports read back.
"""
