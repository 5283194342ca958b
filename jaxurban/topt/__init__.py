"""ToPT (task-oriented prompt tuning for urban region representation learning).

`jaxurban.topt.srel` holds the SREL region-embedding model (HAFusion's view
encoders and fusion followed by the spatially biased Graphormer fusion),
`jaxurban.topt.srel_losses` its self-supervised objectives and
`jaxurban.topt.srel_train` the training driver (`SRELConfig`, `train_srel`).
"""
