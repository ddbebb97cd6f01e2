//go:build tools

// Package sidecars pins the Kubernetes CSI sidecars that the chart deploys, so that
// scripts/install-sidecars.sh builds exactly the releases the chart's image tags name. The
// imports are main packages: this file is never compiled (build tag "tools"), it only keeps
// them in go.mod and go.sum.
package sidecars

import (
	_ "github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher"
	_ "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
	_ "github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
)
