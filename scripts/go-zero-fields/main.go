// Command go-zero-fields prints, as JSON, every field of the Kubernetes API types that Go
// writes in protobuf even when zero (a non-pointer bool, number or string) and leaves out of
// JSON when zero (`omitempty`): message name (as in apiserver/src/http/proto/schema.json) →
// JSON field names. The API server's protobuf decoder drops those zeros, as kube-apiserver's
// Go round trip does.
//
// Run from a Kubernetes source tree with vendor/ (scripts/go-zero-fields.sh does):
//
//	GOFLAGS=-mod=vendor go run ./cmd/go-zero-fields > zero-fields.json
package main

import (
	"encoding/json"
	"os"
	"reflect"
	"sort"
	"strings"

	apiextensions "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/client-go/kubernetes/scheme"
)

func message(t reflect.Type) string {
	return strings.ReplaceAll(strings.TrimPrefix(t.PkgPath(), "k8s.io/"), "/", ".") + "." + t.Name()
}

func main() {
	out := map[string][]string{}
	seen := map[reflect.Type]bool{}
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for t.Kind() == reflect.Ptr || t.Kind() == reflect.Slice || t.Kind() == reflect.Map || t.Kind() == reflect.Array {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || seen[t] || !strings.HasPrefix(t.PkgPath(), "k8s.io/") {
			return
		}
		seen[t] = true
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			tag := f.Tag.Get("json")
			name, opts, _ := strings.Cut(tag, ",")
			walk(f.Type)
			if name == "" || name == "-" || !strings.Contains(opts, "omitempty") {
				continue
			}
			switch f.Type.Kind() {
			case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
				reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
				reflect.Float32, reflect.Float64, reflect.String:
				out[message(t)] = append(out[message(t)], name)
			}
		}
	}
	for _, t := range scheme.Scheme.AllKnownTypes() {
		walk(t)
	}
	walk(reflect.TypeOf(apiextensions.CustomResourceDefinition{}))
	for _, fields := range out {
		sort.Strings(fields)
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", " ")
	if err := encoder.Encode(out); err != nil {
		panic(err)
	}
}
