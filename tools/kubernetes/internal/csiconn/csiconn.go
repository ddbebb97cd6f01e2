// Package csiconn dials a CSI driver's unix socket the way the e2e sidecar stand-ins need it.
package csiconn

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Target turns "/csi/csi.sock" or "unix:///csi/csi.sock" into a gRPC target; the chart passes
// plain paths, the driver's own flags take URLs, and both must work.
func Target(address string) string {
	if strings.HasPrefix(address, "unix://") {
		return address
	}
	return "unix://" + address
}

// Dial returns a client connection; gRPC connects lazily, so errors surface on the first call.
func Dial(address string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(Target(address), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("csi address %q: %w", address, err)
	}
	return conn, nil
}

// Retry calls fn until it succeeds or ctx ends, because the driver container may start after
// its sidecars and its socket appears only once it listens.
func Retry(ctx context.Context, every time.Duration, fn func(context.Context) error) error {
	for {
		err := fn(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(every):
		}
	}
}
