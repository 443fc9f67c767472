// Command cube-agent is the in-sandbox agent: the E2B envd API on :49983
// and the code interpreter on :49999. See internal/agent.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "cube-agent: not yet implemented (issue 2)")
	os.Exit(1)
}
