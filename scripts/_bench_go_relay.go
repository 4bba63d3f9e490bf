// A reference for scripts/bench-proxy (target "go-relay"), not part of Cube: what a compiled
// relay written on Go's standard library costs for the part of cube-proxy's work that is pure
// transport. It does the least a gateway in cube-proxy's place must do per request:
//
//   - HTTP/1.1 in (net/http, keep-alive);
//   - a bearer token looked up by its SHA-256 (as cube-proxy stores PATs);
//   - the /{domain} prefix stripped;
//   - the body read whole, then sent over a kept-alive TLS connection pinned to one
//     certificate's SHA-256 (the attested one: VerifyConnection, no CA);
//   - the answer relayed chunk by chunk with a flush per chunk (streams), its tail kept to find
//     the usage fields.
//
// Nothing else: no limits, metering, audit, logging or attestation. Its throughput is therefore
// an upper bound for a Go data plane, to compare with nginx-tls (the same hop in C).
//
//	go build -o relay _bench_go_relay.go
//	relay -listen 127.0.0.1:P -upstream 127.0.0.1:Q -pin HEX -token TOKEN
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

var usageSeen atomic.Int64

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to serve")
	upstream := flag.String("upstream", "", "host:port of the TLS backend")
	pinHex := flag.String("pin", "", "SHA-256 (hex) of the backend's certificate")
	token := flag.String("token", "", "the one bearer token accepted")
	flag.Parse()
	pin, err := hex.DecodeString(*pinHex)
	if err != nil || len(pin) != sha256.Size || *upstream == "" || *token == "" {
		log.Fatal("give -upstream, -pin (64 hex digits) and -token")
	}
	tokenHash := sha256.Sum256([]byte(*token))

	transport := &http.Transport{
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		TLSClientConfig: &tls.Config{
			// The certificate is checked against the pin below, not against a CA.
			InsecureSkipVerify: true,
			VerifyConnection: func(state tls.ConnectionState) error {
				if len(state.PeerCertificates) == 0 {
					return errors.New("no certificate")
				}
				digest := sha256.Sum256(state.PeerCertificates[0].Raw)
				if !bytes.Equal(digest[:], pin) {
					return errors.New("certificate is not the pinned one")
				}
				return nil
			},
		},
		MaxIdleConns:        512,
		MaxIdleConnsPerHost: 512,
		ForceAttemptHTTP2:   false,
	}
	client := &http.Client{Transport: transport}
	base := "https://" + *upstream

	handler := func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		if !strings.HasPrefix(auth, "Bearer ") {
			http.Error(w, `{"error":"missing token"}`, http.StatusUnauthorized)
			return
		}
		presented := sha256.Sum256([]byte(auth[len("Bearer "):]))
		if subtle.ConstantTimeCompare(presented[:], tokenHash[:]) != 1 {
			http.Error(w, `{"error":"invalid token"}`, http.StatusUnauthorized)
			return
		}
		path := r.URL.Path
		if i := strings.Index(path[1:], "/"); i >= 0 {
			path = path[1+i:] // /{domain}/v1/... -> /v1/...
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
		if err != nil {
			http.Error(w, `{"error":"body"}`, http.StatusBadRequest)
			return
		}
		out, err := http.NewRequestWithContext(r.Context(), r.Method, base+path, bytes.NewReader(body))
		if err != nil {
			http.Error(w, `{"error":"request"}`, http.StatusBadRequest)
			return
		}
		out.Header.Set("Content-Type", r.Header.Get("Content-Type"))
		out.Header.Set("Authorization", "Bearer forwarded-identity")
		response, err := client.Do(out)
		if err != nil {
			http.Error(w, `{"error":"upstream"}`, http.StatusBadGateway)
			return
		}
		defer response.Body.Close()
		for _, name := range []string{"Content-Type", "Cache-Control"} {
			if value := response.Header.Get(name); value != "" {
				w.Header().Set(name, value)
			}
		}
		w.WriteHeader(response.StatusCode)
		flusher, _ := w.(http.Flusher)
		buffer := make([]byte, 16<<10)
		var tail []byte
		for {
			n, err := response.Body.Read(buffer)
			if n > 0 {
				if _, werr := w.Write(buffer[:n]); werr != nil {
					return // the client went away: the deferred Close ends the upstream request
				}
				if flusher != nil {
					flusher.Flush()
				}
				tail = append(tail, buffer[:n]...)
				if len(tail) > 4096 {
					tail = tail[len(tail)-4096:]
				}
			}
			if err != nil {
				break
			}
		}
		if bytes.Contains(tail, []byte(`"usage"`)) {
			usageSeen.Add(1)
		}
	}
	server := &http.Server{Addr: *listen, Handler: http.HandlerFunc(handler)}
	log.Fatal(server.ListenAndServe())
}
