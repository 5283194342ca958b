"""Pictures of region embeddings: t-SNE / PCA projections and city plots."""

from jaxurban.viz.embedding_plot import gdp_levels, plot_city_embeddings
from jaxurban.viz.tsne import pca_2d, tsne

__all__ = ["gdp_levels", "pca_2d", "plot_city_embeddings", "tsne"]
