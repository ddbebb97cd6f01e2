"""Opt-in reconcilers that keep the cluster's record and the nodes' storage in agreement
(docs/operations.md): :mod:`.nodeloss` in the controller Deployment (one leader, :mod:`.lease`)
reports and optionally releases the volumes of Nodes that are gone; :mod:`.orphans` in every
node plugin reports and optionally reclaims storage that no PersistentVolume names. Both are
off unless the chart turns them on, and both do nothing on an API answer they cannot trust.
"""
