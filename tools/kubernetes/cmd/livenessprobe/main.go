// Command livenessprobe answers HTTP /healthz with the result of a CSI Probe call. It stands in
// for the livenessprobe sidecar in the e2e lane (its module is not served by the Go module proxy
// at its v2 tags) and takes the flags the chart passes: --v, --csi-address, --http-endpoint,
// --probe-timeout.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"nodelocal-csi/tools/kubernetes/internal/csiconn"
)

func main() {
	flag.Int("v", 0, "log verbosity (accepted for compatibility)")
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket inside this container")
	httpEndpoint := flag.String("http-endpoint", ":9808", "address of the /healthz endpoint")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "timeout of one Probe call")
	flag.Parse()

	conn, err := csiconn.Dial(*csiAddress)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	identity := csi.NewIdentityClient(conn)

	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			log.Printf("probe failed: %v", err)
			http.Error(w, fmt.Sprintf("probe: %v", err), http.StatusInternalServerError)
			return
		}
		// An absent "ready" means ready (CSI spec: the field is optional).
		if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
			http.Error(w, "driver reports not ready", http.StatusInternalServerError)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	log.Printf("serving /healthz on %s for %s", *httpEndpoint, *csiAddress)
	log.Fatal(http.ListenAndServe(*httpEndpoint, nil))
}
