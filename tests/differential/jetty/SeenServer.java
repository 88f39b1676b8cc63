// A legacy servlet app on embedded Jetty 9.4, for the differential tests: two servlets,
// one mapped at /api/transfers/* (the handler a strict rule protects) and one at /*,
// each answering with what the container made of the request. Prints its port.
import java.io.IOException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import javax.servlet.http.HttpServlet;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import org.eclipse.jetty.server.ForwardedRequestCustomizer;
import org.eclipse.jetty.server.HttpConfiguration;
import org.eclipse.jetty.server.HttpConnectionFactory;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;

public class SeenServer {
    static final class Seen extends HttpServlet {
        private final String handler;

        Seen(String handler) {
            this.handler = handler;
        }

        @Override
        protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            StringBuilder out = new StringBuilder("{");
            field(out, "handler", handler).append(',');
            field(out, "method", req.getMethod()).append(',');
            field(out, "servletPath", req.getServletPath()).append(',');
            field(out, "pathInfo", req.getPathInfo()).append(',');
            field(out, "requestURI", req.getRequestURI()).append(',');
            field(out, "serverName", req.getServerName()).append(',');
            field(out, "remoteAddr", req.getRemoteAddr()).append(',');
            out.append("\"headers\":[");
            boolean first = true;
            for (String name : Collections.list(req.getHeaderNames())) {
                for (String value : Collections.list(req.getHeaders(name))) {
                    if (!first) out.append(',');
                    first = false;
                    out.append('[');
                    string(out, name).append(',');
                    string(out, value).append(']');
                }
            }
            out.append("]}");
            byte[] body = out.toString().getBytes("UTF-8");
            resp.setStatus(200);
            resp.setContentType("application/json");
            resp.setContentLength(body.length);
            resp.getOutputStream().write(body);
        }
    }

    static StringBuilder field(StringBuilder out, String name, String value) {
        string(out, name).append(':');
        return value == null ? out.append("null") : string(out, value);
    }

    static StringBuilder string(StringBuilder out, String value) {
        out.append('"');
        for (char c : value.toCharArray()) {
            if (c == '"' || c == '\\') out.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) out.append(String.format("\\u%04x", (int) c));
            else out.append(c);
        }
        return out.append('"');
    }

    public static void main(String[] args) throws Exception {
        Server server = new Server();
        HttpConfiguration config = new HttpConfiguration();
        // As an app behind a proxy is usually set up: believe X-Forwarded-* / Forwarded.
        config.addCustomizer(new ForwardedRequestCustomizer());
        ServerConnector connector = new ServerConnector(server, new HttpConnectionFactory(config));
        connector.setHost("127.0.0.1");
        connector.setPort(0);
        server.addConnector(connector);
        ServletContextHandler context = new ServletContextHandler();
        context.setContextPath("/");
        context.addServlet(new ServletHolder(new Seen("transfers")), "/api/transfers/*");
        context.addServlet(new ServletHolder(new Seen("default")), "/*");
        server.setHandler(context);
        server.start();
        System.out.println("PORT " + connector.getLocalPort());
        System.out.flush();
        server.join();
    }
}
