"""Clustering of instructions: k-means over sentence embeddings (`kmeans`) and the choice of k
(`choose_k`: the elbow of the SSE curve, and the `cluster` command). Imports nothing, so that
`import hydralora.clustering.kmeans` stays light."""
