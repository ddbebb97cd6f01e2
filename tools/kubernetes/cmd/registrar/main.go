// Command registrar registers a CSI driver with the kubelet through the kubelet's plugin
// registration directory. It stands in for csi-node-driver-registrar in the e2e lane, whose
// module the Go module proxy does not serve at its v2 tags; it accepts the same flags the chart
// passes (--v, --csi-address, --kubelet-registration-path, --plugin-registration-path,
// --http-endpoint) and follows the same protocol: ask the driver its name (GetPluginInfo), serve
// the kubelet's Registration service on <registration dir>/<name>-reg.sock, exit non-zero when
// the kubelet reports a failed registration so the container is restarted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"nodelocal-csi/tools/kubernetes/internal/csiconn"
)

type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	driverName string
	endpoint   string
}

func (s *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("kubelet asked for plugin info: %s at %s", s.driverName, s.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.driverName,
		Endpoint:          s.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s *registrationServer) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet rejected the registration: %s; exiting so the container restarts", st.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s", s.driverName)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(ctx context.Context, address string) (string, error) {
	conn, err := csiconn.Dial(address)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	var name string
	err = csiconn.Retry(ctx, time.Second, func(ctx context.Context) error {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(callCtx, &csi.GetPluginInfoRequest{})
		if err != nil {
			log.Printf("GetPluginInfo on %s: %v (retrying)", address, err)
			return err
		}
		if info.GetName() == "" {
			return errors.New("driver returned an empty name")
		}
		name = info.GetName()
		return nil
	})
	return name, err
}

func main() {
	flag.Int("v", 0, "log verbosity (accepted for compatibility; this program logs every step)")
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket inside this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket as the kubelet sees it on the host")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry directory, mounted")
	httpEndpoint := flag.String("http-endpoint", "", "address of the /healthz endpoint; empty disables it")
	timeout := flag.Duration("timeout", 5*time.Minute, "how long to wait for the driver's name")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	nameCtx, cancel := context.WithTimeout(ctx, *timeout)
	name, err := driverName(nameCtx, *csiAddress)
	cancel()
	if err != nil {
		log.Fatalf("could not get the driver's name from %s: %v", *csiAddress, err)
	}

	socket := filepath.Join(*regDir, fmt.Sprintf("%s-reg.sock", name))
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("removing the stale socket %s: %v", socket, err)
	}
	lis, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", socket, err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrationServer{driverName: name, endpoint: *kubeletPath})
	go func() {
		if err := srv.Serve(lis); err != nil {
			log.Fatalf("registration server: %v", err)
		}
	}()
	log.Printf("serving registration of %s on %s", name, socket)

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		// The kubelet removes unknown sockets when it wipes plugins_registry; a missing socket
		// makes the liveness probe fail and the restart registers again.
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, fmt.Sprintf("registration socket: %v", err), http.StatusInternalServerError)
				return
			}
			_, _ = w.Write([]byte("ok"))
		})
		go func() {
			if err := http.ListenAndServe(*httpEndpoint, mux); err != nil {
				log.Fatalf("http endpoint %s: %v", *httpEndpoint, err)
			}
		}()
	}

	<-ctx.Done()
	log.Printf("stopping; removing %s", socket)
	srv.Stop()
	_ = os.Remove(socket)
}
