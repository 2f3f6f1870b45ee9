"""Recipes: training pipelines that an installed user runs end to end, `python -m timm_lookwhere.recipes.NAME`.

A recipe turns generated or downloaded data into shipped weights with the package's own tools, stage by
stage, each stage resumable, all of it in one output folder. Measuring what it made is a benchmark's job
(benchmarks/ in the source tree), which reads that folder.

    sparse_signs   teacher, distillation, fine-tuning and the low-res baseline on the generated sign scenes;
                   ships `lookwhere_vitt16_256.sparse_signs` and `lookwhere_vitt16_512.sparse_signs`
    dense_signs    a full-res segmenter teacher, LookWhere fine-tuned for segmentation and the low-res baseline on
                   scenes with 1-6 signs and pixel masks; ships the segmenter `lookwhere_vitt16_512.dense_signs`
"""
